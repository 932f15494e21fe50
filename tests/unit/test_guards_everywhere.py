"""API keys on every inference route and RPC, and one in-flight bound for HTTP and gRPC, on the real
ingress (app/ingress.py: its routes, middleware and gRPC methods), without Ray: HTTP through the ASGI
app its replica builds, gRPC through a real `grpc.aio` server and the standard stubs. The models
behind it are never reached here (stub handles): what is tested is what the guards let through.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import httpx
import pytest
from fastapi.routing import APIRoute

from app.config import AppConfig, ModelConfig
from app.core.errors import ModelNotReady
from app.ingress import Ingress
from app.oip.grpc import grpc_predict_v2_pb2 as pb
from app.oip.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

KEY = "unit-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GRPC_AUTH = (("authorization", f"Bearer {KEY}"),)
WRONG = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}]

# Every HTTP route the ingress serves, as README "Security" sorts them: the model routes need a key.
GUARDED = [
    ("GET", "/v1/models"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v2/models/{name}"),
    ("GET", "/v2/models/{name}/ready"),
    ("POST", "/v2/models/{name}/infer"),
]
OPEN = [
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/v2"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
]
GUARDED_RPCS = ["ModelReady", "ModelMetadata", "ModelInfer", "ModelStreamInfer"]
OPEN_RPCS = ["ServerLive", "ServerReady", "ServerMetadata"]
# Not offered at all (UNIMPLEMENTED whatever the key says).
UNIMPLEMENTED_RPCS = ["RepositoryModelLoad", "RepositoryModelUnload"]


class StubHandle:
    """Stands for a model deployment's handle: every call on it answers ModelNotReady (a 503), as a
    deployment without a replica would. Only requests the guards let through get there."""

    def options(self, **_: Any) -> StubHandle:
        return self

    def __getattr__(self, name: str) -> Any:
        return self

    def remote(self, *_: Any) -> Any:
        raise ModelNotReady(f"stub deployment: no replica ({self})")


def ingress(limit: int = 100) -> Any:
    """The ingress deployment's own class, constructed as Serve would (without Serve)."""
    config = AppConfig(
        models=[
            ModelConfig(name="emb", task="embed", source="unused", placement="replica"),
            ModelConfig(name="lm", task="generate", source="unused"),
        ],
        max_inflight_requests=limit,
    )
    # The class app/ingress.py defines, under Serve's ASGI wrapper (whose own set-up needs a replica).
    wrapper = Ingress.func_or_class
    own = next(c for c in wrapper.__mro__[1:] if c.__module__ == "app.ingress" and c.__name__ == "Ingress")
    replica = own(config, {"emb": StubHandle(), "lm": StubHandle()})
    replica.api_keys = (KEY.encode(),)
    return replica


class Servicer:
    """Serve's gRPC proxy calls the ingress method named like the RPC, with the call's context when
    the method takes `grpc_context`: the same here, on a real grpc.aio server."""

    def __init__(self, replica: Any):
        self.replica = replica

    def __getattr__(self, rpc: str) -> Callable:
        method = getattr(self.replica, rpc)
        takes_context = "grpc_context" in inspect.signature(method).parameters
        if inspect.isasyncgenfunction(method):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
                async for item in method(request, context) if takes_context else method(request):
                    yield item

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await (method(request, context) if takes_context else method(request))

        return unary


async def serving(replica: Any) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(replica), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def http_client(replica: Any) -> httpx.AsyncClient:
    app = replica.__serve_build_asgi_app__()
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_every_route_is_either_guarded_or_listed_open():
    app = ingress().__serve_build_asgi_app__()
    served = {(method, r.path) for r in app.routes for method in getattr(r, "methods", ())} - {
        ("HEAD", p) for _, p in OPEN
    }
    assert served == set(GUARDED) | set(OPEN)
    assert all(r.path in {p for _, p in GUARDED + OPEN} for r in app.routes if isinstance(r, APIRoute))
    rpcs = set(pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name)
    assert rpcs == set(GUARDED_RPCS) | set(OPEN_RPCS) | set(UNIMPLEMENTED_RPCS)


@pytest.mark.parametrize("method,path", GUARDED, ids=[p for _, p in GUARDED])
def test_a_model_route_answers_401_without_a_valid_key_and_lets_a_valid_one_through(method, path):
    async def main() -> None:
        async with http_client(ingress()) as client:
            url = path.replace("{name}", "no-such-model")
            body = {"model": "no-such-model", "input": "x", "prompt": "x", "messages": []}
            for headers in WRONG:
                r = await client.request(method, url, json=body, headers=headers)
                assert r.status_code == 401, (headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
            r = await client.request(method, url, json=body, headers=AUTH)
            assert r.status_code != 401, r.text

    run(main())


@pytest.mark.parametrize("method,path", OPEN, ids=[p for _, p in OPEN])
def test_health_and_documents_stay_open(method, path):
    async def main() -> None:
        async with http_client(ingress()) as client:
            assert (await client.request(method, path)).status_code != 401

    run(main())


def _grpc_request(rpc: str) -> Any:
    tensor = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"x")
    infer = pb.ModelInferRequest(model_name="no-such-model", inputs=[tensor])
    return {
        "ModelReady": pb.ModelReadyRequest(name="no-such-model"),
        "ModelMetadata": pb.ModelMetadataRequest(name="no-such-model"),
        "ModelInfer": infer,
        "ModelStreamInfer": infer,
        "ServerLive": pb.ServerLiveRequest(),
        "ServerReady": pb.ServerReadyRequest(),
        "ServerMetadata": pb.ServerMetadataRequest(),
    }[rpc]


async def _call(stub: Any, rpc: str, metadata: tuple) -> grpc.StatusCode:
    """The call's status code; a stream's first response error counts as the stream's answer."""
    request = _grpc_request(rpc)
    try:
        if rpc == "ModelStreamInfer":
            async for response in stub.ModelStreamInfer(iter([request]), metadata=metadata, timeout=20):
                assert response.error_message  # the model is not served: an in-band error
                return grpc.StatusCode.OK
            return grpc.StatusCode.OK
        await getattr(stub, rpc)(request, metadata=metadata, timeout=20)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as err:
        return err.code()


@pytest.mark.parametrize("rpc", GUARDED_RPCS + OPEN_RPCS)
def test_a_model_rpc_answers_unauthenticated_without_a_valid_key_and_health_stays_open(rpc):
    async def main() -> None:
        server, target = await serving(ingress())
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", KEY),)):
                    code = await _call(stub, rpc, metadata)
                    if rpc in GUARDED_RPCS:
                        assert code == grpc.StatusCode.UNAUTHENTICATED, (metadata, code)
                    else:
                        assert code == grpc.StatusCode.OK, (metadata, code)
                code = await _call(stub, rpc, GRPC_AUTH)
                assert code != grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(None)

    run(main())


def test_http_and_grpc_share_one_in_flight_bound():
    """With max_inflight_requests 1, an open ModelStreamInfer stream (one request in flight) makes an
    HTTP request a 503 and a gRPC ModelInfer UNAVAILABLE; once it closes, both pass the gate again."""

    async def main() -> None:
        replica = ingress(limit=1)
        server, target = await serving(replica)
        body = {"model": "no-such-model", "input": "x"}
        try:
            async with grpc.aio.insecure_channel(target) as channel, http_client(replica) as client:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                stream = stub.ModelStreamInfer(metadata=GRPC_AUTH, timeout=20)  # open, no request sent yet
                while replica.inflight.count < 1:  # the servicer has entered the gate
                    await asyncio.sleep(0.01)
                shed = await client.post("/v1/embeddings", json=body, headers=AUTH)
                assert shed.status_code == 503 and shed.headers["retry-after"] == "1", shed.text
                assert shed.json()["error"]["code"] == "overloaded"
                assert await _call(stub, "ModelInfer", GRPC_AUTH) == grpc.StatusCode.UNAVAILABLE
                await stream.done_writing()
                assert [r async for r in stream] == []
                assert replica.inflight.count == 0
                assert (await client.post("/v1/embeddings", json=body, headers=AUTH)).status_code == 404
                assert await _call(stub, "ModelInfer", GRPC_AUTH) == grpc.StatusCode.NOT_FOUND
        finally:
            await server.stop(None)

    run(main())
