"""`make bench`, the batch part: `python -m batch embed` against the raw in-process limit of the same
model and numerics, and against a Celery fan-out over Redis, on the same JSONL rows, side by side
in one run; then its vectors against the online service's /v1/embeddings.

    python -m benchmarks.bench_batch [--rows 100000]        # report: artifacts/bench/batch.md

1. raw: one process holding the model (EmbeddingModel, the model's threads and max_batch_size),
   tokenize + embed_ids over the rows already in memory, slices of --batch-size: the limit.
2. batch: `python -m batch embed --model M --input rows.jsonl --output DIR`, a local cluster of its own;
   rows/s from its summary (read to write, actor start-up and model load included). Runs 1 and 2
   alternate, raw first and last (--repeats batch runs): each batch run is compared with the mean of
   the raw runs on either side of it, since this VM's speed drifts by tens of percent within an hour.
3. celery: redis-server, `celery worker` (prefork, each process holding the model: benchmarks/celery_peer.py)
   timed from submission until every row is written, in two shapes (--celery-shapes): a task per record
   (the article's farm) and a chord of --batch-size slices (Celery tuned for this model).
4. online: `serve run` of the shipped config's embedding model; every row's /v1/embeddings vector is
   compared with the batch output (cosine).

Every process runs at nice 15, the batch job's Ray workers included (benchmarks/__init__.py). Not a test:
nothing asserts on speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import NICE, own_cluster_env
from benchmarks.batch_peers import SHAPES, celery_run, online_cosines, raw_run
from loadtest.scenarios import sentence
from tests.harness import ROOT


def make_input(path: Path, rows: int) -> Path:
    """rows.jsonl of `rows` short sentences (~17 tokens), written once."""
    if path.exists() and sum(1 for _ in path.open()) == rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"id": i, "text": sentence(i)}) + "\n")
    return path


def batch_run(model: str, input_path: Path, out: Path, batch_size: int) -> dict:
    """`python -m batch embed` as a user runs it; rows/s from its summary line."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [
        "nice",
        "-n",
        str(NICE),
        sys.executable,
        "-m",
        "batch",
        "embed",
        "--model",
        model,
        "--input",
        str(input_path),
        "--output",
        str(out),
        "--batch-size",
        str(batch_size),
        "--no-progress",
    ]
    env = own_cluster_env()
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"batch failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    line = next(x for x in done.stdout.splitlines() if "rows written" in x)
    rows = int(line.split(" rows written")[0].replace(",", ""))
    seconds = float(line.split(" in ")[1].split(" s ")[0])
    return {
        "name": "python -m batch embed",
        "rows": rows,
        "seconds": seconds,
        "wall_s": wall,
        "load": (load, os.getloadavg()[0]),
    }


def rate(run: dict) -> float:
    return run["rows"] / run["seconds"]


def report(results: list[dict], cos: dict, args: argparse.Namespace) -> str:
    raws = [r for r in results if r["name"].startswith("raw")]
    batches = [r for r in results if r["name"].startswith("python -m batch")]
    # Each batch run against the mean of the raw runs just before and after it: this VM's speed drifts
    # (the raw limit moved 33% within an hour here), and a neighbour on each side cancels a steady drift.
    ratios = [rate(b) / ((rate(raws[i]) + rate(raws[i + 1])) / 2) for i, b in enumerate(batches)]
    raw = statistics.mean(rate(r) for r in raws)
    batch = statistics.median(rate(b) for b in batches)
    walls = ", ".join(f"{b['wall_s']:.1f} s" for b in batches)
    lines = [
        f"## Batch embeddings: {args.rows:,} JSONL rows, {args.model} ({datetime.date.today()})",
        "",
        (
            f"`python -m benchmarks.bench_batch {' '.join(args.argv)}` on {platform.node()}, "
            f"{os.cpu_count()} CPUs, every process at nice 15, in the order of the table; load average (1 min) "
            "before/after each run in the last column."
        ),
        "",
        "| run | rows | seconds | rows/s | vs raw | python -m batch vs it | load |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['rows']:,} | {r['seconds']:.1f} | {rate(r):,.0f} | "
            f"{rate(r) / raw:.2f}x | {batch / rate(r):.2f}x | {r['load'][0]:.1f} / {r['load'][1]:.1f} |"
        )
    lines += [
        "",
        (
            "`python -m batch embed` against the raw limit, each run against the mean of the raw runs just "
            f"before and after it, in order: {', '.join(f'{x:.2f}x' for x in ratios)} "
            f"(median {statistics.median(ratios):.2f}x). "
            'The table\'s "vs raw" divides by the mean of every raw run, its last column uses the median '
            "`python -m batch` run."
        ),
        "",
        f"`python -m batch embed` wall time, cluster start included: {walls}.",
        "",
        (
            f"Vectors against the online `/v1/embeddings` ({cos['rows']:,} rows): cosine min {cos['min']:.7f}, "
            f"max abs difference {cos['max_abs']:.2e}; rows missing from the batch output: {cos['missing']}."
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_batch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument(
        "--batch-size", type=int, default=1024, help="rows per model call, the same for all three (python -m batch's)"
    )
    ap.add_argument("--celery-procs", type=int, default=2, help="celery worker processes (prefork)")
    ap.add_argument(
        "--celery-shapes", nargs="+", choices=sorted(SHAPES), default=["records", "slices"], help="fan-outs to run"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="python -m batch runs, each between two raw runs (raw, batch, raw, ...)",
    )
    ap.add_argument("--online-every", type=int, default=1, help="compare every Nth row with /v1/embeddings")
    ap.add_argument("--dir", type=Path, default=ROOT / "artifacts" / "bench" / "batch")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    rows = make_input(args.dir / "rows.jsonl", args.rows)
    results = [raw_run(args.model, rows, args.batch_size, NICE)]
    for _ in range(args.repeats):  # raw, batch, raw, ...: every batch run between two raw runs
        results.append(batch_run(args.model, rows, args.dir / "batch-out", args.batch_size))
        results.append(raw_run(args.model, rows, args.batch_size, NICE))
    results += [
        celery_run(args.model, rows, args.dir / f"celery-{shape}", args.batch_size, args.celery_procs, NICE, shape)
        for shape in args.celery_shapes
    ]
    cos = online_cosines(args.model, rows, args.dir / "batch-out", args.online_every)
    text = report(results, cos, args)
    (args.dir.parent / "batch.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
