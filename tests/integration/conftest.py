"""One real Ray cluster and one Serve instance for the whole integration session.

Deployed exactly as `serve run serve_config.yaml` does (ServeDeploySchema → deploy_apps),
from the real config file, with only the HTTP and gRPC ports changed to free ones, and the
pipeline demos of serve_config.pipeline.yaml added behind the same ingress.
"""

from __future__ import annotations

import os

import grpc
import httpx
import pytest
import ray
from ray import serve
from ray._common.test_utils import wait_for_condition
from ray.serve._private import api as serve_api
from ray.serve._private.constants import SERVE_NAMESPACE
from ray.serve.schema import ServeDeploySchema

from app.oip.grpc import grpc_predict_v2_pb2_grpc
from tests.harness import serve_env, with_pipelines
from tests.helpers import free_port, serve_config_on

APP = "rayinfer"


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


@pytest.fixture(scope="session")
def grpc_stub(served):
    """A client of the standard `inference.GRPCInferenceService`, from the stubs of its .proto."""
    with grpc.insecure_channel(served[1]) as channel:
        yield grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="session")
def http(serve_url):
    with httpx.Client(base_url=serve_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def embed_stats(serve_url):
    """The embedding model's batch counters, from the (one) Ingress replica that holds it (placement: ingress)."""
    ingress = serve.get_deployment_handle("Ingress", app_name=APP)
    return lambda: ingress.model_stats.remote("all-MiniLM-L6-v2").result()
