"""Fixtures every pytest directory shares: above all one real Ray cluster and one Serve instance for the
whole session, which the integration tests call and the batch tests run their Ray Data jobs on.

It is deployed exactly as `serve run serve_config.yaml` does (ServeDeploySchema → deploy_apps), from
the real config file, with only the HTTP and gRPC ports changed to free ones, and the pipeline demos
of serve_config.pipeline.yaml added behind the same ingress. The end-to-end tests (tests/e2e) start
their own clusters, in their own pytest process (see the Makefile).
"""

from __future__ import annotations

import os

import pytest
import ray
from ray import serve
from ray._common.test_utils import wait_for_condition
from ray.serve._private import api as serve_api
from ray.serve._private.constants import SERVE_NAMESPACE
from ray.serve.schema import ServeDeploySchema

from tests.harness import serve_env, with_pipelines
from tests.helpers import MODEL, free_port, serve_config_on
from tests.vllm_reference import CASES, LM, offline

APP = "rayinfer"
# Ray's CPUs are bookkeeping: the served application claims 2 (Ingress 1, Generator 1), and a batch job
# 1 more than the machine has, as `python -m batch`'s own cluster counts them (batch/run.py, _connect).
SESSION_CPUS = 2 + (os.cpu_count() or 1) + 1


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where CUDA is; elsewhere they are skipped, with the reason shown (-rs)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run on a GPU machine (pytest -m gpu tests/gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bundled_path():
    from models.loader import resolve_source

    return resolve_source(f"bundled:{MODEL}")


@pytest.fixture(scope="session")
def reference(bundled_path):
    """sentence-transformers' own encoder for the same checkpoint: the ground truth."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(bundled_path), device="cpu")
    return lambda texts: st.encode(list(texts), convert_to_numpy=True, batch_size=64)


@pytest.fixture(scope="session")
def vllm_offline():
    """vLLM's offline engine's results for tests/vllm_reference.py's CASES, by name: computed once, in a
    child process. Ask for it before the session's cluster (before `served`), so the two engines do not
    start at the same time on a small machine."""
    return offline(LM, CASES)


@pytest.fixture(scope="session")
def served():
    """(HTTP URL, gRPC target) of the session's Serve instance."""
    port = free_port()
    config = ServeDeploySchema.model_validate(with_pipelines(serve_config_on(port)))
    os.environ.update(serve_env())  # the cluster inherits it, as with `make serve`
    # The dashboard (on a free port, loopback) writes the Prometheus service-discovery file, as
    # with `serve run`. Metrics reach the agent every second (default 10 s): the Prometheus test waits less.
    ray.init(
        address="local",
        namespace=SERVE_NAMESPACE,
        num_cpus=SESSION_CPUS,
        include_dashboard=True,
        dashboard_port=free_port(),
        log_to_driver=True,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(),
        grpc_options=config.grpc_options.model_dump(),
        proxy_location=config.proxy_location,
    )
    client.deploy_apps(config, _blocking=False)

    def running() -> bool:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"deploy failed: {status.message}")
        return status is not None and status.status == "RUNNING"

    # vLLM's engine starts in ~30 s on an idle 2-core machine, several minutes on a loaded one.
    wait_for_condition(running, timeout=600, retry_interval_ms=500)
    yield f"http://127.0.0.1:{port}", f"127.0.0.1:{config.grpc_options.port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_url(served):
    return served[0]
