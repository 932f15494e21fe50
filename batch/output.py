"""The output directory: result Parquet files, the errors, the checkpoint, the run's manifest.

    DIR/<write-uuid>_<task>-<i>.parquet   results: the id and `embedding` (or `text`, `finish_reason`)
    DIR/_errors/<write-uuid>_<task>.parquet   bad rows of the same write task: the id and the reason
    DIR/_errors/noid-*.parquet            rows without a usable id (batch/sources.py)
    DIR/_errors.jsonl                     all of the errors, one JSON object a line, rewritten at the end
    DIR/_checkpoint/                      Ray Data's checkpoint: the ids each committed write task holds
    DIR/_manifest.json                    what produced DIR: a resume must match it

Exactly once is Ray Data's checkpointing (`ray.data.checkpoint`): each write task first records
its ids as a *pending* checkpoint named after its data file, writes the data, then renames the
checkpoint to committed. A restarted run deletes the data files of pending checkpoints (a write
cut short), then skips every committed id as it reads. A task retried within a run (a worker
killed) writes the same file names again. Errors ride in the same write task as the results, so
they are committed, or rolled back, together. Names starting with `_` are skipped by Ray Data,
pandas and pyarrow when DIR is read as a Parquet dataset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data._internal.datasource.parquet_datasink import ParquetDatasink
from ray.data._internal.execution.interfaces.task_context import TaskContext
from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME
from ray.data.block import Block, BlockAccessor
from ray.data.checkpoint import CheckpointConfig
from ray.data.datasource.datasink import WriteResult

from batch.sources import ERROR

ERRORS_DIR = "_errors"
CHECKPOINT_DIR = "_checkpoint"
MANIFEST = "_manifest.json"
ERRORS_FILE = "_errors.jsonl"


class ManifestMismatch(ValueError):
    """DIR holds the output of a run with other arguments."""


def claim(out: Path, manifest: dict) -> None:
    """Record what writes to `out`, or check that a resumed run is the same run."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(json.dumps(manifest))  # as it reads back: tuples are lists
    path = out / MANIFEST
    if path.exists():
        before = json.loads(path.read_text())
        diff = {k: (before.get(k), v) for k, v in manifest.items() if before.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in sorted(diff.items()))
            raise ManifestMismatch(
                f"{out} holds the output of another run ({detail}): "
                "give the same arguments to resume it, or another --output"
            )
        return
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path)


def checkpoint_config(out: Path, id_field: str) -> CheckpointConfig:
    """Ray Data's checkpoint under DIR, kept after success so that a re-run skips every row."""
    config = CheckpointConfig(
        id_column=id_field, checkpoint_path=str(out / CHECKPOINT_DIR), delete_checkpoint_on_success=False
    )
    # One filter actor: each holds every committed id, and a small machine has no core to spare.
    config.checkpoint_actor_pool_max_size = 1
    return config


def committed_rows(out: Path) -> int:
    """Rows (results and errors) whose write tasks committed in earlier runs."""
    ckpt = out / CHECKPOINT_DIR
    if not ckpt.is_dir():
        return 0
    return sum(pq.ParquetFile(f).metadata.num_rows for f in ckpt.glob("*.parquet") if ".pending." not in f.name)


class ResultSink(ParquetDatasink):
    """Ray's Parquet datasink, with a row's error (if any) written beside the results under _errors/."""

    def __init__(self, path: str, id_field: str, columns: list[str], rows_per_file: int):
        # No dictionary pages: vectors and ids hardly repeat, and trying them cost 5.5 against 2.5 µs per
        # 384-float row here, for files 9% larger.
        super().__init__(path, min_rows_per_file=rows_per_file, arrow_parquet_args={"use_dictionary": False})
        self.id_field, self.columns = id_field, columns
        self.totals = {"ok": 0, "errors": 0}  # of this run, filled in on the driver when the write completes

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> dict[str, int]:  # type: ignore[override]
        # Ray's file sinks return nothing; these counts reach on_write_complete on the driver.
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"ok": 0, "errors": 0}
        table = pa.concat_tables(tables, promote_options="default")
        bad = pc.is_valid(table[ERROR])
        ok, err = table.filter(pc.invert(bad)), table.filter(bad)
        if err.num_rows:
            base = self.filename_provider.get_filename_for_task(ctx.kwargs[WRITE_UUID_KWARG_NAME], ctx.task_idx)
            errors = pa.table({self.id_field: err[self.id_field], "reason": err[ERROR]})
            target = Path(self.path) / ERRORS_DIR / f"{Path(base).stem}.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(errors, target)  # a cut-short write is rolled back by name, as the results are
        if ok.num_rows:
            super().write([ok.select([self.id_field, *self.columns])], ctx)
        return {"ok": ok.num_rows, "errors": err.num_rows}

    def on_write_complete(self, write_result: WriteResult) -> None:
        super().on_write_complete(write_result)
        for counts in write_result.write_returns:
            for key in self.totals:
                self.totals[key] += (counts or {}).get(key, 0)


def consolidate_errors(out: Path, id_field: str) -> int:
    """DIR/_errors.jsonl from every error part, written whole then renamed; the number of errors."""
    parts = sorted((out / ERRORS_DIR).glob("*.parquet")) if (out / ERRORS_DIR).is_dir() else []
    tmp, count = out / f".{ERRORS_FILE}.tmp", 0
    with tmp.open("w") as fh:
        for part in parts:
            for batch in pq.ParquetFile(part).iter_batches(batch_size=8192):
                for row in batch.to_pylist():
                    record = {"id": _plain(row.get(id_field, row.get("id"))), "reason": row["reason"]}
                    if row.get("source"):
                        record["source"] = row["source"]
                    fh.write(json.dumps(record) + "\n")
                    count += 1
    os.replace(tmp, out / ERRORS_FILE)
    return count


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value
