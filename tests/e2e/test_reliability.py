"""Reliability and security against `serve run serve_config.yaml` (the shipped config, a free
port, API keys set through the environment): keys, a burst past the limits, schemathesis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.harness import free_port, serve_config_on, serve_run
from tests.helpers import MODEL

# A module's first test starts its cluster, a vLLM engine among it: minutes on a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

KEY = "test-key-7f3a"
INFLIGHT = 64
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def config():
    config = serve_config_on(free_port())
    # A lower ingress bound than the shipped 256, so the burst is mostly past it on 2 cores.
    config["applications"][0]["args"]["max_inflight_requests"] = INFLIGHT
    return config


@pytest.fixture(scope="module")
def served(config, tmp_path_factory):
    env = {"RAYINFER_API_KEYS": f"other-key,{KEY}"}
    with serve_run(config, env=env, log_dir=tmp_path_factory.mktemp("serve")) as url:
        yield url


def test_grpc_model_calls_need_the_key_too(served, config):
    import grpc

    from app.oip.grpc import grpc_predict_v2_pb2 as pb
    from app.oip.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{config['grpc_options']['port']}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live  # health stays open
        request = pb.ModelMetadataRequest(name=MODEL)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelMetadata(request, metadata=metadata, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.ModelMetadata(request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=30).name == MODEL


def test_inference_routes_need_a_valid_key_and_health_is_open(served):
    body = {"model": MODEL, "input": "hello"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{served}/v1/embeddings", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{served}/v1/models", timeout=30).status_code == 401
    assert httpx.post(f"{served}/v1/embeddings", json=body, headers=AUTH, timeout=30).status_code == 200
    assert httpx.get(f"{served}/healthz", timeout=30).status_code == 200
    assert httpx.get(f"{served}/readyz", timeout=30).status_code == 200


def burst(url: str, method: str, path: str, body=None) -> list[tuple[int, float, str | None]]:
    """800 requests at once: (status, seconds from the moment each went on the wire, Retry-After).
    Timed from the wire because the client's own work for 800 requests on a shared 2-core
    machine (seconds) is not the server's latency."""
    sent: dict[int, float] = {}

    async def on_request(request: httpx.Request) -> None:
        sent[id(request)] = time.perf_counter()

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, float, str | None]:
        r = await client.request(method, path, json=body(i) if body else None)
        return r.status_code, time.perf_counter() - sent[id(r.request)], r.headers.get("retry-after")

    async def go():
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=url, headers=AUTH, limits=limits, timeout=120, event_hooks={"request": [on_request]}
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(800)))

    return asyncio.run(go())


def test_a_burst_of_800_gets_only_200s_and_fast_503s_with_retry_after(served):
    # What answering anything costs in such a burst on this machine, measured in the same run: the
    # same 800 connections to /healthz, which does no work (and is not counted as inference).
    baseline = sorted(t for _, t, _ in burst(served, "GET", "/healthz"))
    results = burst(served, "POST", "/v1/embeddings", lambda i: {"model": MODEL, "input": [f"burst request {i}"] * 4})
    statuses = {s for s, _, _ in results}
    ok = [t for s, t, _ in results if s == 200]
    shed = [(t, ra) for s, t, ra in results if s == 503]
    shed_s = sorted(t for t, _ in shed) or [0.0]
    p50 = {"503": shed_s[len(shed_s) // 2], "healthz": baseline[len(baseline) // 2]}
    print(
        f"burst of 800: {len(ok)} x 200, {len(shed)} x 503; 503 latency p50 {p50['503']:.2f}s "
        f"p90 {shed_s[int(len(shed_s) * 0.9)]:.2f}s max {shed_s[-1]:.2f}s; slowest 200 {max(ok, default=0):.2f}s; "
        f"800 x /healthz: p50 {p50['healthz']:.2f}s max {baseline[-1]:.2f}s"
    )
    assert statuses <= {200, 503}, statuses
    assert ok, "some requests must be served"
    assert len(ok) >= INFLIGHT // 2
    assert all(ra == "1" for _, ra in shed), "every 503 carries Retry-After"
    # Shed at once, never a pile-up of timeouts: a 503 costs about what a health check costs in the
    # same burst, plus the served requests' model work on the same two cores. Relative, because
    # both scale with how busy the machine is (measured: healthz p50 3.3 s, 503 p50 4.7 s, with
    # another Ray cluster running beside it).
    assert p50["503"] < 2 * p50["healthz"] + 0.5, p50


def test_a_grpc_burst_gets_only_ok_and_unavailable_with_retry_pushback(served, config):
    import grpc

    from app.oip.grpc import grpc_predict_v2_pb2 as pb
    from app.oip.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    def request(i: int) -> pb.ModelInferRequest:
        tensor = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[4])
        tensor.contents.bytes_contents.extend([f"grpc burst {i}".encode()] * 4)
        return pb.ModelInferRequest(model_name=MODEL, inputs=[tensor])

    async def one(stub, i: int) -> tuple[grpc.StatusCode, dict]:
        call = stub.ModelInfer(request(i), metadata=(("authorization", f"Bearer {KEY}"),), timeout=120)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call
        return await call.code(), dict(await call.trailing_metadata() or ())

    async def go():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{config['grpc_options']['port']}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            return await asyncio.gather(*(one(stub, i) for i in range(400)))

    results = asyncio.run(go())
    codes = [code for code, _ in results]
    print(
        f"gRPC burst of 400: {codes.count(grpc.StatusCode.OK)} OK, "
        f"{codes.count(grpc.StatusCode.UNAVAILABLE)} UNAVAILABLE"
    )
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, set(codes)
    assert codes.count(grpc.StatusCode.OK) >= INFLIGHT // 2
    assert grpc.StatusCode.UNAVAILABLE in codes, "400 at once must pass max_inflight_requests (64)"
    assert all(meta.get("grpc-retry-pushback-ms") == "1000" for code, meta in results if code != grpc.StatusCode.OK)


def test_schemathesis_finds_no_5xx(served):
    """Every operation of /openapi.json, with generated valid and invalid bodies: never a 5xx."""
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
        )
        def check(case):
            response = case.call(base_url=served, headers=AUTH, timeout=60)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.path} {case.body!r:.300} → {response.status_code}: {response.text[:300]}"
                )

        check()
    assert not failures, "\n".join(failures)
