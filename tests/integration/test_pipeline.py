"""tiny-lm split into two Stage deployments gives the unsplit model's tokens, through the API."""

from __future__ import annotations

import asyncio

import httpx
from ray import serve

APP = "rayinfer"


def test_stages_are_deployments_of_their_own(serve_url):
    deployments = serve.status().applications[APP].deployments
    assert {"Stage0-tiny-lm-pipeline", "Stage1-tiny-lm-pipeline", "Generator-tiny-lm-pipeline"} <= set(deployments)
    layers = [serve.get_deployment_handle(f"Stage{k}-tiny-lm-pipeline", app_name=APP).info.remote().result()["layers"]
              for k in range(2)]
    assert layers == [(0, 2), (2, 4)]


def test_two_stages_give_the_whole_models_tokens_under_concurrency(serve_url):
    bodies = [{"prompt": f"Serving models online {i} " * (1 + i % 3), "max_tokens": 6 + i % 10,
               "temperature": 0 if i % 2 else 0.9, "seed": i} for i in range(12)]

    async def run(model: str) -> list[str]:
        async with httpx.AsyncClient(base_url=serve_url, timeout=120) as c:
            rs = await asyncio.gather(*(c.post("/v1/completions", json={"model": model, **b}) for b in bodies))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
        return [r.json()["choices"][0]["text"] for r in rs]

    assert asyncio.run(run("tiny-lm-pipeline")) == asyncio.run(run("tiny-lm"))
