"""The continuous-batching engine and the Generator replica's logic, without Ray, on tiny-lm."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.config import ModelConfig
from app.errors import InputTooLong, InvalidInput
from deployments.generator import Generator
from deployments.types import GenerateJob
from models.causal_lm import CausalLM
from models.generation import Engine
from models.params import SamplingParams
from models.tiny_lm import ensure

PROMPTS = [
    "Serving models online",
    "The replica holds the model",
    "A",
    "When the queue is full, the server says so quickly, and the client",
    "Tokens stream back",
    "Latency is measured at the tail: the median hides",
]


@pytest.fixture(scope="module")
def lm() -> CausalLM:
    return CausalLM(ensure())


def run(engine: Engine, jobs: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, tuple[list[int], str, str]]:
    """Drive the engine until every job finishes: id -> (tokens, text, finish_reason)."""
    for seq_id, (prompt, params) in jobs.items():
        engine.add(seq_id, prompt, params)
    tokens = {i: [] for i in jobs}
    text = {i: "" for i in jobs}
    finish = {}
    while engine.has_work():
        for out in engine.step():
            tokens[out.seq_id].append(out.token_id)
            text[out.seq_id] += out.text
            if out.finish_reason:
                finish[out.seq_id] = out.finish_reason
    return {i: (tokens[i], text[i], finish[i]) for i in jobs}


def solo(lm: CausalLM, prompt: list[int], params: SamplingParams) -> tuple[list[int], str, str]:
    return run(Engine(lm), {"solo": (prompt, params)})["solo"]


def test_greedy_equals_hugging_face_generate(lm):
    hf = AutoModelForCausalLM.from_pretrained(lm.path).eval()
    for text in PROMPTS:
        ids = lm.encode(text)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        ref_new = ref[0, len(ids) :].tolist()
        tokens, out_text, finish = solo(lm, ids, SamplingParams(max_tokens=40, temperature=0))
        assert tokens == ref_new, text
        assert out_text == lm.decode(ref_new)
        assert finish == ("stop" if ref_new[-1] in lm.eos_ids else "length")


def test_thirty_concurrent_sequences_each_equal_their_solo_run(lm):
    rng = random.Random(7)
    jobs = {}
    for i in range(30):
        prompt = lm.encode(" ".join(rng.sample(" ".join(PROMPTS).split(), rng.randint(1, 20))))
        params = SamplingParams(
            max_tokens=rng.randint(1, 48),
            temperature=0 if i % 2 else 0.9,
            top_p=1.0 if i % 3 else 0.8,
            seed=i,
        )
        jobs[f"s{i}"] = (prompt, params)
    together = run(Engine(lm, max_batch_size=12), jobs)  # sequences join as others leave
    for seq_id, (prompt, params) in jobs.items():
        assert together[seq_id] == solo(lm, prompt, params), seq_id


def test_same_seed_same_sample_and_seeds_differ(lm):
    prompt = lm.encode(PROMPTS[0])
    samples = [solo(lm, prompt, SamplingParams(max_tokens=32, temperature=1.0, seed=s))[0] for s in (1, 1, 2)]
    assert samples[0] == samples[1]
    assert samples[0] != samples[2]


def test_stop_string_ends_the_text_before_it(lm):
    prompt = lm.encode(PROMPTS[0])
    full = solo(lm, prompt, SamplingParams(max_tokens=40, temperature=0))[1]
    stop = full[5:8]
    assert len(full) > 8 and stop.strip()
    tokens, text, finish = solo(lm, prompt, SamplingParams(max_tokens=40, temperature=0, stop=(stop,)))
    assert finish == "stop"
    assert text == full[: full.index(stop)]


def test_abort_frees_the_slot_before_the_next_step(lm):
    engine = Engine(lm)
    engine.add("a", lm.encode(PROMPTS[0]), SamplingParams(max_tokens=100, temperature=0))
    engine.add("b", lm.encode(PROMPTS[1]), SamplingParams(max_tokens=100, temperature=0))
    engine.step()
    assert engine.running == 2
    engine.abort("a")
    outs = engine.step()
    assert [o.seq_id for o in outs] == ["b"] and engine.running == 1


def test_token_budget_bounds_the_running_batch(lm):
    engine = Engine(lm, max_batch_tokens=100)
    for i in range(4):
        engine.add(str(i), lm.encode(PROMPTS[0]), SamplingParams(max_tokens=40, temperature=0))
    engine.step()
    assert engine.running == 2 and engine.waiting == 2  # (prompt + 40) fits twice in 100


# The replica's request logic, without Ray: num_threads and device set, so it asks Ray nothing.


def replica(source: str) -> object:
    cfg = ModelConfig(name="m", task="generate", source=source, num_threads=1, device="cpu")
    return Generator.func_or_class(cfg)


def collect(gen, job: GenerateJob) -> list:
    async def go():
        return [item async for item in gen.generate(job)]

    return asyncio.run(go())


def test_replica_streams_choices_and_rejects_bad_jobs(tmp_path):
    gen = replica(str(ensure()))
    items = collect(gen, GenerateJob(SamplingParams(max_tokens=5, temperature=0), prompts=["a b", [5, 6, 7]], n=2))
    chunks = [c for item in items for c in item]
    assert {c.index for c in chunks} == {0, 1, 2, 3}
    assert sorted(c.completion_tokens for c in chunks if c.finish_reason) == [5, 5, 5, 5]

    [err] = collect(gen, GenerateJob(SamplingParams(max_tokens=511), prompts=["a b c d e f"]))
    assert isinstance(err, InputTooLong) and "512" in err.message and "511 for the completion" in err.message
    [err] = collect(gen, GenerateJob(SamplingParams(), prompts=[[1, 10**6]]))
    assert isinstance(err, InvalidInput) and err.param == "prompt"


def test_chat_needs_a_chat_template(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ensure().iterdir():
        (plain / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    job = GenerateJob(SamplingParams(max_tokens=3), messages=[{"role": "user", "content": "hi"}])
    [err] = collect(replica(str(plain)), job)
    assert isinstance(err, InvalidInput) and err.param == "model" and "chat template" in err.message
    items = collect(replica(str(ensure())), job)
    assert items and not isinstance(items[0], Exception)


# Pipeline stages in-process: the same engine over two stage runners instead of one whole model.


def test_two_stages_give_the_whole_models_tokens(lm):
    from models.stages import stage_runner

    stages = [stage_runner(lm.path, 0, 2), stage_runner(lm.path, 2, 4)]
    jobs = {f"s{i}": (lm.encode(p), SamplingParams(max_tokens=24, temperature=0 if i % 2 else 0.8, seed=i))
            for i, p in enumerate(PROMPTS * 3)}
    whole = run(Engine(lm, max_batch_size=7), jobs)
    split = run(Engine(lm, max_batch_size=7, runners=stages), jobs)
    assert split == whole


def test_a_stage_range_outside_the_model_is_refused(lm):
    from models.stages import load_stage

    with pytest.raises(ValueError, match="not within the model's 4 layers"):
        load_stage(lm.path, 2, 6)
