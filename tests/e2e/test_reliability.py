"""Reliability and security against `serve run serve_config.yaml` (the shipped config, a free
port, API keys set through the environment): keys, a burst past the limits, schemathesis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.harness import free_port, serve_config_on, serve_run
from tests.helpers import MODEL

# A module's first test starts its cluster, a vLLM engine among it: minutes on a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

KEY = "test-key-7f3a"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def config():
    return serve_config_on(free_port())  # the shipped config, and the shipped bounds (app/haproxy.py)


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


@dataclass
class Answer:
    path: str
    status: int
    seconds: float  # from the moment its request was written on its open connection to the answer's last byte
    connect_s: float  # opening the connection before that (the kernel's handshake, HAProxy's accept)
    headers: dict[str, str]
    body: bytes


async def _send(port: int, path: str, raw: bytes) -> Answer:
    opened = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.perf_counter()
    try:
        writer.write(raw)
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = headers.get("content-length")
        body = await (reader.readexactly(int(length)) if length is not None else reader.read())
        return Answer(path, status, time.perf_counter() - start, start - opened, headers, body)
    finally:
        writer.close()


def burst(url: str, requests: list[tuple[str, dict]]) -> list[Answer]:
    """All `requests` (path, JSON body) at once, each on its own connection. Raw HTTP/1.1 written
    from pre-encoded bytes, like wrk: the client's own work per request is microseconds, so on a
    shared 2-core machine the time measured is the server's, not the client's."""
    port = int(url.rsplit(":", 1)[1])

    def encode(path: str, body: dict) -> bytes:
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        return head.encode() + data

    raw = [(path, encode(path, body)) for path, body in requests]

    async def go():
        return await asyncio.gather(*(_send(port, path, data) for path, data in raw))

    return asyncio.run(go())


def test_a_burst_of_800_gets_only_200s_and_503s_with_retry_after_each_within_a_second(served):
    """The first hop (HAProxy, bounded by app/haproxy.py) sheds what the ingress replica has no slot for,
    whatever the replica's backlog: OpenAI's body under /v1, OIP's under /v2."""
    infer = f"/v2/models/{MODEL}/infer"
    requests = [
        (infer, {"inputs": [{"name": "text", "shape": [4], "datatype": "BYTES", "data": [f"burst {i}"] * 4}]})
        if i % 4 == 3
        else ("/v1/embeddings", {"model": MODEL, "input": [f"burst request {i}"] * 4})
        for i in range(800)
    ]
    answers = burst(served, requests)
    ok = [a for a in answers if a.status == 200]
    shed = sorted((a for a in answers if a.status == 503), key=lambda a: a.seconds)
    times = [a.seconds for a in shed] or [0.0]
    connects = sorted(a.connect_s for a in answers)
    print(
        f"burst of 800: {len(ok)} x 200, {len(shed)} x 503; 503 after p50 {times[len(times) // 2]:.3f}s "
        f"p99 {times[int(len(times) * 0.99)]:.3f}s max {times[-1]:.3f}s; slowest 200 "
        f"{max((a.seconds for a in ok), default=0):.2f}s; connections opened in p50 "
        f"{connects[len(connects) // 2]:.3f}s max {connects[-1]:.3f}s"
    )
    assert {a.status for a in answers} <= {200, 503}, {(a.status, a.body[:200]) for a in answers} - {200, 503}
    # Shedding happened, and only where the replica had no slot: neither everything served nor nothing.
    assert shed, "800 at once must pass the first hop's bound"
    assert len(ok) >= 64 and len(shed) >= 400, (len(ok), len(shed))
    assert all(a.headers.get("retry-after") == "1" for a in shed), "every 503 carries Retry-After"
    for a in shed:
        error = json.loads(a.body)["error"]
        assert isinstance(error, str) if a.path == infer else error["code"] == "overloaded", (a.path, a.body)
    assert {a.path for a in shed} == {infer, "/v1/embeddings"}
    # The promise is about the worst case: every 503, not the median, within a second of sending the
    # request. Timed from the request written on an open connection, so HAProxy's accept and everything
    # after it count, the kernel's handshake does not. A local run of the whole suite had 7 answers at
    # 1.05 s with the p50 at 0.23 s, and the kernel's count of SYNs resent (TCPSynRetrans, after a 1 s
    # timeout) was 7 since boot after it; CI's slowest, 1.08 s, looked the same.
    assert times[-1] < 1.0, [round(t, 3) for t in times[-10:]]


def test_a_grpc_burst_gets_only_ok_and_unavailable_with_retry_pushback(served, config):
    import grpc

    from app.oip.grpc import grpc_predict_v2_pb2 as pb
    from app.oip.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    def request(i: int) -> pb.ModelInferRequest:
        tensor = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[4])
        tensor.contents.bytes_contents.extend([f"grpc burst {i}".encode()] * 4)
        return pb.ModelInferRequest(model_name=MODEL, inputs=[tensor])

    async def one(stub, i: int) -> tuple[grpc.StatusCode, dict, float]:
        start = time.perf_counter()
        call = stub.ModelInfer(request(i), metadata=(("authorization", f"Bearer {KEY}"),), timeout=120)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call
        return await call.code(), dict(await call.trailing_metadata() or ()), time.perf_counter() - start

    async def go():
        # 8 connections of 100 calls: HAProxy lets 100 streams at once into one HTTP/2 connection
        # (tune.h2.max-concurrent-streams), so one channel alone could never pass the bound. A local
        # subchannel pool per channel: gRPC would otherwise share one connection among them.
        target, options = f"127.0.0.1:{config['grpc_options']['port']}", [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(8)]
        try:
            stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
            return await asyncio.gather(*(one(stubs[i % 8], i) for i in range(800)))
        finally:
            await asyncio.gather(*(c.close() for c in channels))

    results = asyncio.run(go())
    codes = [code for code, _, _ in results]
    refused = sorted(t for code, _, t in results if code == grpc.StatusCode.UNAVAILABLE) or [0.0]
    print(
        f"gRPC burst of 800: {codes.count(grpc.StatusCode.OK)} OK, "
        f"{codes.count(grpc.StatusCode.UNAVAILABLE)} UNAVAILABLE, the slowest after {refused[-1]:.3f}s"
    )
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, set(codes)
    assert codes.count(grpc.StatusCode.OK) >= 64
    assert codes.count(grpc.StatusCode.UNAVAILABLE) >= 100, "800 at once must pass the first hop's bound"
    assert all(meta.get("grpc-retry-pushback-ms") == "1000" for code, meta, _ in results if code != grpc.StatusCode.OK)
    # Timed by grpcio's asyncio client, whose own work for 800 calls on one event loop is part of this
    # (the HTTP burst writes raw bytes instead): measured 1.35 s for the slowest, most of the refused
    # calls finishing at the same instant, when the client's loop got to them. A maximum all the same.
    assert refused[-1] < 2.0, refused[-10:]


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
