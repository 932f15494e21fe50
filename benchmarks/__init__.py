"""`make bench`: every process of a benchmark run at one nice (NICE), servers, peers and load generators alike.

Ray's raylet starts its workers `RAY_worker_niceness` (15) above its own nice, so a cluster started from
a process already at nice 15 runs its workers (the replicas, the model, vLLM's engine) at 19, below the
peers and the load generator at 15: with the machine busy, the scheduler gives them 15/36 of a nice-15
process's share (checked: under `nice -n 15`, a Ray task reports nice 19; with RAY_worker_niceness=0, 15).
A benchmark calls `same_nice()` before starting anything, and its clusters inherit SAME_NICE_ENV.

One nice is not enough where each session is a scheduling group of its own (Linux autogroups, on
here): groups share the CPUs as equals, whatever their tasks' nice, and a load generator in another
session than a Ray cluster was starved of CPU. `same_nice()` therefore also keeps every server, peer
and cluster the benchmark starts in the benchmark's own session (tests/harness.py `launch` says more).
"""

from __future__ import annotations

import os

from tests.harness import SAME_SESSION

NICE = 15
# Ray workers at their raylet's nice (the bench's), and every server started in the bench's session.
SAME_NICE_ENV = {"RAY_worker_niceness": "0", SAME_SESSION: "1"}


def own_cluster_env() -> dict[str, str]:
    """The environment for a command that must start a Ray cluster of its own (`python -m batch`):
    never $RAY_ADDRESS's, and its workers at the bench's nice."""
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **SAME_NICE_ENV}


def same_nice(nice: int = NICE) -> None:
    """This process (and what it starts) at `nice`, Ray clusters it starts with workers at it too, and
    whatever it launches in this process's session."""
    os.nice(nice - os.nice(0))
    os.environ.update(SAME_NICE_ENV)
