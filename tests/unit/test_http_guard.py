"""API keys and the ingress's in-flight bound, on a bare FastAPI app (no Ray)."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI

from app.config import AppConfig
from app.core import deadline
from app.core.errors import ERROR_TABLE, Unauthorized
from app.core.guard import InflightGate, key_matches, load_api_keys
from app.http.errors import ErrorBodies, install_error_handlers
from app.http.middleware import AuthMiddleware, BodyLimitMiddleware, DeadlineMiddleware, InflightLimitMiddleware
from app.oip.rest import routes as oip_routes
from app.openai import routes as openai_routes


class Gate:
    """Holds requests inside the route until opened; `entered` is set once `expect` are in."""

    def __init__(self, expect: int):
        self.expect, self.count = expect, 0
        self.entered, self.open = asyncio.Event(), asyncio.Event()

    async def hold(self) -> None:
        self.count += 1
        if self.count >= self.expect:
            self.entered.set()
        await self.open.wait()


def _app(keys=(), limit=(1000, 1), gate: Gate | None = None, max_bytes: int = 1 << 20) -> FastAPI:
    """The ingress's middleware stack and error bodies (as app/ingress.py wires them) over stub routes."""
    app = FastAPI()
    bodies = ErrorBodies(
        {openai_routes.PREFIX: openai_routes.ERROR_BODY, oip_routes.PREFIX: oip_routes.ERROR_BODY},
        default=openai_routes.ERROR_BODY,
    )
    app.add_middleware(BodyLimitMiddleware, limit=max_bytes, bodies=bodies)
    app.add_middleware(InflightLimitMiddleware, gate=InflightGate(*limit), bodies=bodies)
    app.add_middleware(AuthMiddleware, keys=keys, bodies=bodies)
    app.add_middleware(DeadlineMiddleware)
    install_error_handlers(app, bodies)

    @app.post("/v1/embeddings")
    @app.post("/v2/models/m/infer")
    async def embeddings() -> dict:
        if deadline.expired(deadline.CURRENT.get()):  # as the edge batcher answers a request past its deadline
            raise deadline.exceeded("edge_batch", "m")
        if gate is not None:
            await gate.hold()
        return {"ok": True}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    return app


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_keys_come_from_the_environment_and_a_file(tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("# ops keys\nfile-key\n\n  other-key  \n")
    config = AppConfig(api_keys_env="MY_KEYS", api_keys_file=str(keyfile))
    assert load_api_keys(config, {"MY_KEYS": "env-a, env-b,,"}) == (b"env-a", b"env-b", b"file-key", b"other-key")
    assert load_api_keys(AppConfig(), {}) == ()


def test_key_matching_needs_a_bearer_token_equal_to_a_key():
    keys = (b"k1", b"secret")
    assert key_matches(b"Bearer secret", keys)
    assert key_matches(b"bearer k1", keys)
    assert not key_matches(b"Bearer secre", keys)
    assert not key_matches(b"secret", keys)
    assert not key_matches(b"Basic secret", keys)
    assert not key_matches(None, keys)


def test_unauthorized_is_401_unauthenticated_in_the_one_table():
    kind = ERROR_TABLE[Unauthorized]
    assert (kind.http_status, kind.grpc_code, kind.code) == (401, "UNAUTHENTICATED", "invalid_api_key")


def test_inference_routes_need_a_key_and_health_stays_open():
    async def main():
        async with _client(_app(keys=(b"secret",))) as client:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
                r = await client.post("/v1/embeddings", headers=headers)
                assert r.status_code == 401
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert r.json()["error"]["type"] == "invalid_request_error"
            r = await client.post("/v1/embeddings", headers={"Authorization": "Bearer secret"})
            assert r.status_code == 200
            assert (await client.get("/healthz")).status_code == 200

    run(main())


def test_no_keys_configured_means_open():
    async def main():
        async with _client(_app(keys=())) as client:
            assert (await client.post("/v1/embeddings")).status_code == 200

    run(main())


def test_past_the_inflight_limit_the_ingress_answers_503_with_retry_after_at_once():
    async def main():
        gate = Gate(expect=3)
        async with _client(_app(limit=(3, 2), gate=gate)) as client:
            held = [asyncio.ensure_future(client.post("/v1/embeddings")) for _ in range(3)]
            await gate.entered.wait()  # three requests are inside the route: the next is over the limit
            shed = await client.post("/v1/embeddings")
            assert shed.status_code == 503
            assert shed.headers["retry-after"] == "2"
            assert shed.json()["error"]["code"] == "overloaded"
            assert (await client.get("/healthz")).status_code == 200  # health is never shed
            gate.open.set()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200, 200]
            assert (await client.post("/v1/embeddings")).status_code == 200

    run(main())


def test_guards_answer_each_protocol_with_its_own_error_body():
    """401, 413 and 503 from the middleware, 504 from a request past its deadline: OpenAI's body under /v1,
    OIP's `{"error": "..."}` under /v2."""

    async def answers(path: str) -> list[httpx.Response]:
        gate, auth = Gate(expect=1), {"Authorization": "Bearer k"}
        async with _client(_app(keys=(b"k",), limit=(1, 1), gate=gate, max_bytes=1024)) as client:
            unauthorized = await client.post(path)
            too_large = await client.post(path, headers=auth, content=b"x" * 2048)
            held = asyncio.ensure_future(client.post(path, headers=auth))
            await gate.entered.wait()  # one request inside: the next is over the limit of 1
            shed = await client.post(path, headers=auth)
            gate.open.set()
            assert (await held).status_code == 200
            expired = await client.post(path, headers={**auth, "x-request-timeout-seconds": "0.000001"})
            return [unauthorized, too_large, shed, expired]

    for path in ("/v1/embeddings", "/v2/models/m/infer"):
        responses = run(answers(path))
        assert [r.status_code for r in responses] == [401, 413, 503, 504]
        for r in responses:
            if path.startswith("/v2"):
                assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str), r.json()
            else:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.json()
