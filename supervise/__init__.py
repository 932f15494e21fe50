"""Run rayinfer's Ray cluster as a service: one stop request drains it within a bound, a second stops
it at once, nothing of it outlives the stop, and a start after a crash cleans up the crashed run's
leftovers (`python -m supervise --help`; README "Starting and stopping")."""

from __future__ import annotations

import contextlib
import sys


def log(message: str) -> None:
    """One line on stderr, where `make serve`'s user or the service manager's journal sees it."""
    with contextlib.suppress(OSError):  # the terminal may be gone; the run still stops
        print(f"rayinfer: {message}", file=sys.stderr, flush=True)
