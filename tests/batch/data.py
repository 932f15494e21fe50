"""Inputs for the batch tests: rows of short sentences, and the vectors they must get."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ["offline", "batch", "inference", "streams", "rows", "through", "a", "tokenizer", "and", "a", "model"]
WORDS += ["pool", "then", "writes", "vectors", "once", "per", "id", "even", "when", "a", "worker", "dies"]


def sentence(i: int, words: int = 12) -> str:
    """A short sentence (about 17 tokens), different for each i."""
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(words)) + f" #{i}"


LONG = "word " * 400  # 402 tokens: over all-MiniLM-L6-v2's 256


def texts(ids) -> list[str]:
    return [sentence(i) for i in ids]


def write_jsonl(path: Path, ids, extra_lines: list[str] = ()) -> Path:
    with path.open("w") as fh:
        for i in ids:
            fh.write(json.dumps({"id": i, "text": sentence(i)}) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")
    return path


def write_csv(path: Path, ids) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["doc", "body", "other"])
        for i in ids:
            w.writerow([f"d{i}", sentence(i), 'x,"quoted"\nline'])
    return path


def write_parquet(path: Path, ids) -> Path:
    pq.write_table(pa.table({"id": pa.array(list(ids), pa.int64()), "text": texts(ids)}), path)
    return path


def read_output(out: Path, id_field: str = "id") -> dict:
    """{id: vector} of every result row; fails on a repeated id."""
    table = pq.read_table(out)
    ids = table[id_field].to_pylist()
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} repeated ids in {out}"
    vectors = np.asarray(table["embedding"].to_pylist(), dtype=np.float32)
    return dict(zip(ids, vectors))


def read_errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]
