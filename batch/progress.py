"""A progress bar over the whole job: rows out of the model, rows/s, ETA.

Ray Data's own bars are per operator; its rich UI has no ETA and its tqdm bars drew nothing
in a terminal here (Ray 2.60). So the model's last stage adds each batch's row count to a small
counter actor, and the driver draws one rich bar from it (a terminal), or logs a line every
`log_every_s` (a log file).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import cast

import ray
from ray.actor import ActorHandle
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

logger = logging.getLogger("batch")


class RowCounter:
    """Rows that have left the model; updated fire-and-forget by the model's actors."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, n: int) -> None:
        self.rows += n

    def get(self) -> int:
        return self.rows


def start_counter() -> ActorHandle:
    """A RowCounter actor (no CPU) for this job."""
    return cast(ActorHandle, ray.remote(num_cpus=0)(RowCounter).remote())


class JobProgress:
    """Polls the job's RowCounter on a thread while the job runs; `total` is an estimate (JSONL/CSV: lines).
    Without a counter (`--no-progress`) it does nothing."""

    def __init__(self, counter: ActorHandle | None, total: int, log_every_s: float = 30.0, poll_s: float = 0.5):
        self.counter, self.total, self.enabled = counter, max(total, 0), counter is not None
        self.log_every_s, self.poll_s = log_every_s, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-progress", daemon=True)

    def __enter__(self) -> None:
        if self.enabled:
            self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        if sys.stderr.isatty():
            self._bar()
        else:
            self._log()

    def _bar(self) -> None:
        columns = (
            TextColumn("[bold]rows"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} rows/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task("rows", total=self.total or None, rate="-")
            start = time.monotonic()
            while True:
                done = self._safe_count()
                rate = done / max(time.monotonic() - start, 1e-9)
                bar.update(task, completed=done, rate=f"{rate:,.0f}")
                if self._stop.wait(self.poll_s):
                    break

    def _log(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(self.log_every_s):
            self._log_line(start)
        self._log_line(start)  # where it ended

    def _log_line(self, start: float) -> None:
        done = self._safe_count()
        elapsed = time.monotonic() - start
        rate = done / elapsed if elapsed else 0.0
        eta = (self.total - done) / rate if rate and self.total > done else 0.0
        logger.info(
            "%s/%s rows, %.0f rows/s, elapsed %.0f s, ETA %.0f s",
            f"{done:,}",
            f"{self.total:,}",
            rate,
            elapsed,
            eta,
        )

    def _safe_count(self) -> int:
        if self.counter is None:
            return 0
        try:
            return cast(int, ray.get(self.counter.get.remote(), timeout=10))
        except ray.exceptions.RayError:  # the counter is gone at shutdown: progress is cosmetic
            return 0
