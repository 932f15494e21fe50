"""The load-test tool's client against a real local HTTP server: what a slow, a refused and a streamed
answer become in the samples."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from loadtest import runner
from loadtest.scenarios import Completions, Embeddings
from tests.helpers import free_port


async def _serve(routes: list[web.RouteDef], port: int) -> web.AppRunner:
    app = web.Application()
    app.add_routes(routes)
    site_runner = web.AppRunner(app)
    await site_runner.setup()
    await web.TCPSite(site_runner, "127.0.0.1", port).start()
    return site_runner


def test_a_read_past_the_timeout_is_a_timeout_and_a_refused_connection_names_its_error():
    never = asyncio.Event()

    async def hang(_request):
        await never.wait()

    async def main():
        port = free_port()
        server = await _serve([web.post("/v1/embeddings", hang)], port)
        try:
            slow = await runner.closed_loop(f"http://127.0.0.1:{port}", Embeddings("m", 1), 2, 0.3, 0.0, 0.1)
        finally:
            never.set()
            await server.cleanup()
        refused = await runner.closed_loop(f"http://127.0.0.1:{free_port()}", Embeddings("m", 1), 1, 0.2, 0.0, 1.0)
        return slow, refused

    slow, refused = asyncio.run(main())
    assert slow and {s.outcome.status for s in slow} == {"timeout"}
    assert all(s.latency_s >= 0.1 for s in slow)
    assert refused and {s.outcome.status for s in refused} == {"ClientConnectorError"}


def test_a_streamed_completion_reports_tokens_first_token_and_gaps():
    chunks = [{"choices": [{"text": t}]} for t in "abc"]
    chunks.append({"choices": [], "usage": {"completion_tokens": 3}})  # the last chunk: the server's count

    async def stream(request):
        if (await request.json()).get("stream") is not True:
            return web.json_response({"error": "not a stream"}, status=400)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write(f"data: {json.dumps(chunk)}\r\n\r\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async def main():
        port = free_port()
        server = await _serve([web.post("/v1/completions", stream)], port)
        try:
            return await runner.closed_loop(f"http://127.0.0.1:{port}", Completions("m", 3), 1, 0.2, 0.0, 5.0)
        finally:
            await server.cleanup()

    samples = asyncio.run(main())
    assert samples and all(s.outcome.status == "200" for s in samples)
    out = samples[0].outcome
    assert out.tokens == 3 and len(out.itl_s) == 2
    assert 0 < out.ttft_s <= samples[0].latency_s and out.tpot_s is not None
