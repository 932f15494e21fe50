"""The Embedder replica as a pipeline's driver, without Ray: real encoder stages behind in-process handles."""

from __future__ import annotations

import asyncio

import numpy as np

from app.config import ModelConfig
from deployments.embedder import Embedder
from models.embedding import EmbeddingModel
from models.encoder_stages import load_encoder_stage
from tests.helpers import MODEL


class StageHandle:
    """A Stage deployment's handle, in-process: `encode.remote(x)` runs a real encoder stage as a task,
    first awaiting `x` when it is another stage's answer, as Serve resolves a DeploymentResponse argument.
    `gate(x)`, awaited before the stage runs, lets a test order the stages' work."""

    def __init__(self, stage, gate=None):
        self.stage, self.gate, self.encode = stage, gate, self

    def remote(self, x):
        return asyncio.ensure_future(self._run(x))

    async def _run(self, x):
        if isinstance(x, asyncio.Future):
            x = await x
        if self.gate is not None:
            await self.gate(x)
        return self.stage(x)


def test_a_second_batch_enters_the_first_stage_while_the_first_is_in_the_second(bundled_path):
    entered_stage0: list[int] = []
    second_batch_in_stage0 = asyncio.Event()

    async def stage0_gate(x):
        entered_stage0.append(x.states.shape[0])
        if len(entered_stage0) == 2:
            second_batch_in_stage0.set()

    async def stage1_gate(x):
        # A driver that waited for batch A's vectors before sending batch B would never get past this.
        await second_batch_in_stage0.wait()

    handles = [
        StageHandle(load_encoder_stage(bundled_path, 0, 1), stage0_gate),
        StageHandle(load_encoder_stage(bundled_path, 1, 6), stage1_gate),
    ]
    cfg = ModelConfig(name="p", task="embed", source=f"bundled:{MODEL}", pipeline_stages=2, num_threads=1, device="cpu")
    driver = Embedder.func_or_class(cfg, handles)
    assert driver.model.model is None  # the driver holds no weights
    whole = EmbeddingModel(bundled_path)
    a = whole.tokenize(["one short text", "and another, a little longer than the first one"])
    b = whole.tokenize(["a third text", "x", "the fifth"])

    async def both():
        return await asyncio.wait_for(asyncio.gather(driver._forward(a), driver._forward(b)), timeout=120)

    got_a, got_b = asyncio.run(both())
    assert entered_stage0 == [2, 3]
    np.testing.assert_allclose(got_a, whole.embed_ids(a), atol=1e-5)
    np.testing.assert_allclose(got_b, whole.embed_ids(b), atol=1e-5)
