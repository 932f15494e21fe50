"""Input files → a Ray dataset of (id, value, error) rows, tolerant of bad rows.

JSONL, CSV and Parquet, named by a file, a directory (its files of that format, names starting
with `_` or `.` skipped) or a glob. One datasource reads all three, a chunk of rows at a time:

- a row whose value is missing or of the wrong type keeps its id and carries an error reason
  (`ERROR`) down the pipeline, to end in the errors file;
- a row with no usable id (no id, null, not a string or an integer; a JSONL line that is not a
  JSON object) cannot be tracked by id, so it never enters the dataset: its error is written at
  once to `<output>/_errors/noid-<file>-<chunk>.parquet`, a name that depends only on the file
  and the chunk, so a retried or resumed read rewrites the same file.

JSONL and CSV ids become strings (JSON 17 → "17"): one id type whatever the file, which
Ray Data's checkpoint needs. Parquet ids keep their column's type.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import FileBasedDatasource
from ray.data.datasource.file_meta_provider import DefaultFileMetadataProvider

VALUE = "_value"  # the text (embed) or the prompt / messages as JSON (generate)
ERROR = "_error"  # why a row cannot be processed; null for a good row
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
CHUNK_ROWS = 4096

# A value check: the value as it goes down the pipeline, or an error reason.
Check = Callable[[Any], "tuple[Any, str | None]"]


class InputError(ValueError):
    """The input cannot be read at all (no files, mixed formats, a missing column): nothing runs."""


def expand(path: str, fmt: str | None = None) -> tuple[list[str], str]:
    """The input files `path` names (a file, a directory or a glob), sorted, and their format."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = [str(f) for f in sorted(p.rglob("*")) if f.is_file() and not _hidden(f.relative_to(p))]
    elif p.is_file():
        files = [str(p)]
    else:
        files = sorted(f for f in glob.glob(str(p), recursive=True) if os.path.isfile(f))
    if fmt is None:
        formats = {FORMATS.get(_suffix(f)) for f in files}
        if None in formats and p.is_dir():  # a directory: take the files of a known format
            files = [f for f in files if _suffix(f) in FORMATS]
            formats.discard(None)
        if len(formats) > 1 or None in formats:
            raise InputError(
                f"{path}: cannot tell one input format from the names ({sorted(map(str, formats))}); "
                f"give --format ({', '.join(sorted(set(FORMATS.values())))})"
            )
        fmt = formats.pop() if formats else None
    if not files or fmt is None:
        raise InputError(f"{path}: no input files")
    return [str(Path(f).resolve()) for f in files], fmt


def _hidden(rel: Path) -> bool:
    return any(part.startswith(("_", ".")) for part in rel.parts)


def _suffix(path: str) -> str:
    return Path(path).suffix.lower()


def text_check(value: Any) -> tuple[Any, str | None]:
    """embed: a string (possibly empty)."""
    if value is None:
        return None, "missing text"
    if not isinstance(value, str):
        return None, f"text: expected a string, got {_json_type(value)}"
    return value, None


def _json_type(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def _id(value: Any) -> tuple[str | None, str | None]:
    if value is None or value == "":
        return None, "missing id"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"id: expected a string or an integer, got {_json_type(value)}"
    return str(value), None


@dataclasses.dataclass(frozen=True)
class Fields:
    """Which fields of a row are read, and how."""

    id_field: str
    value_field: str  # several, comma-separated: the first a row has (generate: prompt,messages)
    check: Check  # the value as it goes down the pipeline, or why not
    id_type: pa.DataType = dataclasses.field(default_factory=pa.string)  # Parquet: its column's

    @property
    def value_fields(self) -> list[str]:
        return self.value_field.split(",")

    def table(self, ids: list | pa.Array, values: list, errors: list) -> pa.Table:
        return pa.table(
            {
                self.id_field: pa.array(ids, self.id_type),
                VALUE: pa.array(values, pa.string()),
                ERROR: pa.array(errors, pa.string()),
            }
        )


class RowsSource(FileBasedDatasource):
    """Reads (id, value, error) rows from JSONL, CSV or Parquet files (see the module's doc)."""

    def __init__(self, paths: list[str], fmt: str, fields: Fields, errors_dir: str, rows: dict[str, int] | None = None):
        super().__init__(paths, meta_provider=_RowCounts(rows or {}))
        self.fmt, self.fields, self.errors_dir = fmt, fields, errors_dir

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        if self.fmt == "parquet":  # Parquet needs seeking: the file, not the stream
            chunks = parquet_chunks(pq.ParquetFile(self._filesystem.open_input_file(path)), self.fields, path)
        else:
            chunks = text_chunks(f, self.fmt, self.fields, path)
        for index, (rows, no_id) in enumerate(chunks):
            if no_id:
                write_noid_errors(self.errors_dir, path, index, no_id)
            if rows.num_rows:
                yield rows


Chunk = tuple[pa.Table, list[dict]]  # rows with an id; errors of rows without one (reason, source)


def text_chunks(f: Any, fmt: str, fields: Fields, path: str) -> Iterator[Chunk]:
    """JSONL or CSV rows from the binary stream `f`, CHUNK_ROWS lines at a time."""
    stream = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="" if fmt == "csv" else None)
    records = _csv_records(stream) if fmt == "csv" else _jsonl_records(stream)
    ids, values, errors, no_id = [], [], [], []
    for line, record, problem in records:
        rid, id_problem = (None, problem) if problem else _id(record.get(fields.id_field))
        if id_problem:
            no_id.append({"reason": id_problem, "source": f"{path}:{line}"})
            continue
        value, reason = fields.check(next((record[f] for f in fields.value_fields if f in record), None))
        ids.append(rid)
        values.append(value)
        errors.append(reason)
        if len(ids) + len(no_id) >= CHUNK_ROWS:
            yield fields.table(ids, values, errors), no_id
            ids, values, errors, no_id = [], [], [], []
    yield fields.table(ids, values, errors), no_id


def parquet_chunks(pf: pq.ParquetFile, fields: Fields, path: str) -> Iterator[Chunk]:
    """Parquet rows, CHUNK_ROWS at a time; a value column of another type than the check wants makes
    every row an error, a missing one every row a `missing` one."""
    names = pf.schema_arrow.names
    if fields.id_field not in names:
        raise InputError(f"{path}: no column {fields.id_field!r} (columns: {', '.join(names)}); see --id-field")
    value = next((f for f in fields.value_fields if f in names), None)
    first_row = 0
    for batch in pf.iter_batches(batch_size=CHUNK_ROWS, columns=[fields.id_field] + ([value] if value else [])):
        ids = batch.column(fields.id_field)
        raw = batch.column(value).to_pylist() if value else [None] * len(ids)
        checked = [fields.check(v) for v in raw]
        valid = ids.is_valid()
        no_id = [
            {"reason": "missing id", "source": f"{path}:row {first_row + i}"}
            for i, ok in enumerate(valid.to_pylist())
            if not ok
        ]
        first_row += len(ids)
        yield fields.table(ids, [c[0] for c in checked], [c[1] for c in checked]).filter(valid), no_id


class _RowCounts(DefaultFileMetadataProvider):
    """Each read task's row count, summed from the files' (count_rows): Ray Data's progress bars get
    a total, hence an ETA."""

    def __init__(self, rows: dict[str, int]):
        super().__init__()
        self.rows = rows

    def _get_block_metadata(self, paths: list[str], **kwargs: Any) -> BlockMetadata:
        meta = super()._get_block_metadata(paths, **kwargs)
        if all(p in self.rows for p in paths):
            meta = dataclasses.replace(meta, num_rows=sum(self.rows[p] for p in paths))
        return meta


def _jsonl_records(stream: io.TextIOBase) -> Iterator[tuple[int, dict, str | None]]:
    for line_no, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            yield line_no, {}, f"invalid JSON: {exc}"
            continue
        if not isinstance(record, dict):
            yield line_no, {}, f"expected a JSON object, got {_json_type(record)}"
            continue
        yield line_no, record, None


def _csv_records(stream: io.TextIOBase) -> Iterator[tuple[int, dict, str | None]]:
    reader = csv.DictReader(stream)
    for record in reader:
        # An empty CSV cell is as good as absent: CSV cannot tell "" from nothing.
        yield reader.line_num, {k: (v if v != "" else None) for k, v in record.items()}, None


def write_noid_errors(errors_dir: str, path: str, chunk: int, rows: list[dict]) -> None:
    """Rows without a usable id, written at once under a name fixed by (file, chunk): idempotent."""
    digest = hashlib.sha1(path.encode()).hexdigest()[:16]
    target = Path(errors_dir) / f"noid-{digest}-{chunk:08d}.parquet"
    table = pa.table(
        {
            "id": pa.nulls(len(rows), pa.string()),
            "reason": [r["reason"] for r in rows],
            "source": [r["source"] for r in rows],
        }
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, target)


def parquet_id_type(files: list[str], id_field: str) -> pa.DataType:
    """The id column's type, from the first Parquet file's schema."""
    schema = pq.read_schema(files[0])
    if id_field not in schema.names:
        raise InputError(f"{files[0]}: no column {id_field!r} (columns: {', '.join(schema.names)}); see --id-field")
    return schema.field(id_field).type


def count_rows(files: list[str], fmt: str) -> dict[str, int]:
    """Rows per file (Parquet: exact, from the footer; JSONL and CSV: lines, an estimate for the ETA)."""
    counts = {}
    for name in files:
        if fmt == "parquet":
            counts[name] = pq.ParquetFile(name).metadata.num_rows
            continue
        lines = 0
        with open(name, "rb") as fh:
            while block := fh.read(1 << 20):
                lines += block.count(b"\n")
        counts[name] = max(0, lines - (1 if fmt == "csv" else 0))  # CSV: less the header line
    return counts
