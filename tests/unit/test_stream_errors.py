"""A stream that fails after its first chunk (its Generator replica died: ReplicaLost) ends with an
in-band OpenAI error event and `[DONE]`, on the real ingress app without Ray (README API, Reliability)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from app.core.errors import ReplicaLost
from deployments.types import GenerateChunk, GenerateJob
from tests.unit.test_guards_everywhere import AUTH, http_client, ingress, run


def test_a_stream_whose_replica_dies_after_its_first_chunk_ends_in_band_with_done():
    replica = ingress()

    async def dies_after_one_chunk(name: str, job: GenerateJob) -> AsyncIterator:
        yield [GenerateChunk(index=0, text="Hello", finish_reason=None, prompt_tokens=3, completion_tokens=1)]
        raise ReplicaLost("the replica died under the request; retry")

    replica.registry.generate = dies_after_one_chunk

    async def main() -> list[str]:
        async with http_client(replica) as client:
            body = {"model": "lm", "prompt": "Hi", "max_tokens": 8, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body, headers=AUTH) as r:
                assert r.status_code == 200  # the stream had started: the status was already sent
                return [line[len("data: ") :] async for line in r.aiter_lines() if line.startswith("data: ")]

    events = run(main())
    assert json.loads(events[0])["choices"][0]["text"] == "Hello"
    error = json.loads(events[1])["error"]
    assert error["code"] == "model_not_ready" and "retry" in error["message"], error
    assert events[2:] == ["[DONE]"]
