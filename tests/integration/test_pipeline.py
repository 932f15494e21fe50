"""tiny-lm split into two Stage deployments gives the unsplit model's tokens, through the API."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
from ray import serve

APP = "rayinfer"


def test_stages_are_deployments_of_their_own(serve_url):
    deployments = serve.status().applications[APP].deployments
    assert {"Stage0-tiny-lm-pipeline", "Stage1-tiny-lm-pipeline", "Generator-tiny-lm-pipeline"} <= set(deployments)
    layers = [
        serve.get_deployment_handle(f"Stage{k}-tiny-lm-pipeline", app_name=APP).info.remote().result()["layers"]
        for k in range(2)
    ]
    assert layers == [(0, 2), (2, 4)]


def test_two_stages_give_the_whole_models_tokens_under_concurrency(serve_url):
    bodies = [
        {
            "prompt": f"Serving models online {i} " * (1 + i % 3),
            "max_tokens": 6 + i % 10,
            "temperature": 0 if i % 2 else 0.9,
            "seed": i,
        }
        for i in range(12)
    ]

    async def run(model: str) -> list[str]:
        async with httpx.AsyncClient(base_url=serve_url, timeout=120) as c:
            rs = await asyncio.gather(*(c.post("/v1/completions", json={"model": model, **b}) for b in bodies))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
        return [r.json()["choices"][0]["text"] for r in rs]

    assert asyncio.run(run("tiny-lm-pipeline")) == asyncio.run(run("tiny-lm"))


def test_a_stage_dying_mid_stream_fails_the_stream_fast_and_the_pipeline_recovers(serve_url):
    import json
    import time

    import ray
    from ray._common.test_utils import wait_for_condition

    body = {
        "model": "tiny-lm-pipeline",
        "prompt": "Serving models online",
        "max_tokens": 480,
        "stream": True,
        "temperature": 0.7,
        "seed": 5,
    }
    with httpx.Client(base_url=serve_url, timeout=90) as c, c.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        [name] = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "Stage1-tiny-lm-pipeline" in a["name"] and "REPLICA" in a["name"]
        ]
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=False)
        killed = time.monotonic()
        events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    # The stream ends (no hang) with an in-band, retriable error, not with 480 tokens of text.
    assert time.monotonic() - killed < 60
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and error["code"] == "model_not_ready"

    def text(model: str) -> str | None:
        r = httpx.post(
            f"{serve_url}/v1/completions",
            json={"model": model, "prompt": "a b", "max_tokens": 12, "temperature": 0},
            timeout=30,
        )
        return r.json()["choices"][0]["text"] if r.status_code == 200 else None

    # Back in service with the restarted stage, and still the unsplit model's tokens.
    expected = text("tiny-lm")
    wait_for_condition(lambda: text("tiny-lm-pipeline") == expected, timeout=120, retry_interval_ms=1000)


# all-MiniLM-L6-v2 split in 2: the Embedder drives two encoder Stage deployments.

EMBED = "all-MiniLM-L6-v2-pipeline"


def test_encoder_stages_are_deployments_of_their_own(serve_url):
    deployments = serve.status().applications[APP].deployments
    names = [f"Embedder-{EMBED}", f"Stage0-{EMBED}", f"Stage1-{EMBED}"]
    assert {n: deployments[n].status for n in names} == dict.fromkeys(names, "HEALTHY")
    layers = [
        serve.get_deployment_handle(f"Stage{k}-{EMBED}", app_name=APP).info.remote().result()["layers"]
        for k in range(2)
    ]
    assert layers == [(0, 1), (1, 6)]  # balanced by bytes: the word embeddings weigh five layers


def test_two_encoder_stages_give_the_unsplit_vectors_under_concurrency(serve_url):
    from tests.helpers import MODEL

    # Texts from 3 to ~200 tokens, so every batch pads most of its rows.
    texts = [f"text {i}: " + "serving models online is mostly queueing " * (i % 7) * (1 + i % 5) for i in range(40)]
    requests = [texts[i : i + 1 + i % 4] for i in range(0, 40, 2)]

    async def run(model: str) -> list[np.ndarray]:
        async with httpx.AsyncClient(base_url=serve_url, timeout=120) as c:
            rs = await asyncio.gather(*(c.post("/v1/embeddings", json={"model": model, "input": r}) for r in requests))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
        return [np.array([d["embedding"] for d in r.json()["data"]]) for r in rs]

    embedder = serve.get_deployment_handle(f"Embedder-{EMBED}", app_name=APP)
    before = embedder.batch_stats.remote().result()
    split, whole = asyncio.run(run(EMBED)), asyncio.run(run(MODEL))
    for got, expected in zip(split, whole):
        np.testing.assert_allclose(got, expected, atol=1e-5)
    after = embedder.batch_stats.remote().result()
    assert after["jobs"] - before["jobs"] == len(requests)  # every request went through the pipeline's driver
