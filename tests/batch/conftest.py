"""One local Ray cluster for the batch tests' in-process runs (its own pytest process: see the Makefile).

Runs that must own their cluster (the killed driver) start it themselves, as `python -m batch` does.
"""

from __future__ import annotations

import pytest
import ray

from tests.helpers import free_port


@pytest.fixture(scope="session")
def cluster():
    # As `python -m batch` starts one: a CPU more than the machine (batch/run.py, _connect); the
    # dashboard for the state API, on a free loopback port.
    ray.init(address="local", num_cpus=3, include_dashboard=True, dashboard_port=free_port(), log_to_driver=False)
    yield ray.cluster_resources()
    ray.shutdown()
