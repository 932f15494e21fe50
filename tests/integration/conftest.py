"""Clients of the session's Serve instance (`served`, tests/conftest.py)."""

from __future__ import annotations

import grpc
import httpx
import pytest
from ray import serve

from app.oip.grpc import grpc_predict_v2_pb2_grpc

APP = "rayinfer"


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
