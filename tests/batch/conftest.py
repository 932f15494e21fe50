"""The batch tests' in-process runs use the session's Ray cluster (`served`, tests/conftest.py): the one
the integration tests serve the shipped config on, with CPUs counted for a batch job besides it.

Runs that must own their cluster (the killed driver) start it themselves, as `python -m batch` does.
"""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="session")
def cluster(served):
    return ray.cluster_resources()
