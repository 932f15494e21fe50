"""The continuous-batching engine and the Generator replica's logic, without Ray, on tiny-lm."""

from __future__ import annotations

import asyncio
import json
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.config import ModelConfig
from app.core.errors import InputTooLong, InvalidInput
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
            ref = hf.generate(
                torch.tensor([ids]), max_new_tokens=40, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id
            )
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
    _tokens, text, finish = solo(lm, prompt, SamplingParams(max_tokens=40, temperature=0, stop=(stop,)))
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
    jobs = {
        f"s{i}": (lm.encode(p), SamplingParams(max_tokens=24, temperature=0 if i % 2 else 0.8, seed=i))
        for i, p in enumerate(PROMPTS * 3)
    }
    whole = run(Engine(lm, max_batch_size=7), jobs)
    split = run(Engine(lm, max_batch_size=7, runners=stages), jobs)
    assert split == whole


def test_a_stage_range_outside_the_model_is_refused(lm):
    from models.stages import load_stage

    with pytest.raises(ValueError, match="not within the model's 4 layers"):
        load_stage(lm.path, 2, 6)


# Micro-batches: the running batch split into groups that take turns, each stage keeping a cache per group.


class Answer:
    """A stage's answer as the engine sees a DeploymentResponse: the engine waits on it with .result()."""

    def __init__(self, value, log, group):
        self.value, self.log, self.group = value, log, group

    def result(self):
        self.log.append(f"wait {self.group}")
        return self.value


class Deferred:
    """A real stage runner seen as a remote stage: it computes at once, in call order (a Stage replica takes its
    calls one at a time), and answers with an `Answer`. The last stage logs when a group's decode is launched."""

    def __init__(self, runner, log=None):
        self.runner, self.log = runner, log

    def prefill(self, seq_id, x):
        return Answer(self.runner.prefill(seq_id, getattr(x, "value", x)), [], None)

    def decode(self, seq_ids, x, lengths, group=0):
        if self.log is not None:
            self.log.append(f"launch {group}")
        return Answer(self.runner.decode(seq_ids, getattr(x, "value", x), lengths, group), self.log or [], group)

    def drop(self, seq_ids):
        self.runner.drop(seq_ids)

    def reset(self):
        self.runner.reset()


@pytest.mark.parametrize("microbatches", [2, 3])
def test_micro_batches_through_two_stages_give_the_whole_models_tokens(lm, microbatches):
    from models.stages import stage_runner

    rng = random.Random(microbatches)
    jobs = {
        f"s{i}": (
            lm.encode(p),
            SamplingParams(
                max_tokens=rng.randint(1, 30), temperature=0 if i % 2 else 0.8, top_p=1.0 if i % 3 else 0.8, seed=i
            ),
        )
        for i, p in enumerate(PROMPTS * 3)
    }
    whole = run(Engine(lm, max_batch_size=7), jobs)  # sequences join as others leave
    stages = [Deferred(stage_runner(lm.path, 0, 2)), Deferred(stage_runner(lm.path, 2, 4), log=[])]
    split = run(Engine(lm, max_batch_size=7, runners=stages, microbatches=microbatches), jobs)
    assert split == whole


def test_one_groups_decode_is_launched_while_the_others_is_in_flight(lm):
    from models.stages import stage_runner

    def pattern(microbatches: int) -> list[str]:
        log: list[str] = []
        stages = [Deferred(stage_runner(lm.path, 0, 2)), Deferred(stage_runner(lm.path, 2, 4), log=log)]
        engine = Engine(lm, runners=stages, microbatches=microbatches)
        for i in range(4):
            engine.add(f"s{i}", lm.encode(PROMPTS[i]), SamplingParams(max_tokens=20, temperature=0.7, seed=i))
        for _ in range(6):
            engine.step()
        return log[:6]

    assert pattern(1) == ["launch 0", "wait 0", "launch 0", "wait 0", "launch 0", "wait 0"]
    # Before the engine waits for a group's logits, the other group's decode is already on its way.
    assert pattern(2) == ["launch 0", "launch 1", "wait 0", "launch 0", "wait 1", "launch 1"]


def test_each_group_keeps_its_batch_cache_while_groups_take_turns(lm, monkeypatch):
    from models.kv_runner import KVRunner
    from models.stages import stage_runner

    rebuilds = []
    real = KVRunner._rebuild
    monkeypatch.setattr(KVRunner, "_rebuild", lambda self, group, *a: rebuilds.append(group) or real(self, group, *a))
    prompts = {f"s{i}": lm.encode(PROMPTS[i]) for i in range(4)}

    def decode(groups: list[list[str]]) -> dict[str, torch.Tensor]:
        runners = [stage_runner(lm.path, 0, 2), stage_runner(lm.path, 2, 4)]
        length = {s: len(p) for s, p in prompts.items()}
        for s, p in prompts.items():
            x = torch.tensor([p])
            for r in runners:
                x = r.prefill(s, x)
        out = {}
        for step in range(5):
            for g, ids in enumerate(groups):
                x = torch.tensor([[7 + step]] * len(ids))
                for r in runners:
                    x = r.decode(ids, x, [length[s] for s in ids], g)
                for s, row in zip(ids, x):
                    out[s], length[s] = row, length[s] + 1
        return out

    together = decode([["s0", "s1", "s2", "s3"]])
    rebuilds.clear()
    alternating = decode([["s0", "s1"], ["s2", "s3"]])
    assert rebuilds == [0, 0, 1, 1]  # once per group in each of the 2 stages, not once per turn
    for s in prompts:
        torch.testing.assert_close(alternating[s], together[s], atol=1e-5, rtol=0)


@pytest.mark.parametrize("start,end", [(0, 2), (2, 4), (1, 3)])
def test_a_stage_built_on_the_meta_device_holds_the_checkpoints_weights_and_computed_buffers(lm, start, end):
    from safetensors.torch import load_file

    from models.stages import load_stage

    stage, _first, last = load_stage(lm.path, start, end)
    whole = AutoModelForCausalLM.from_pretrained(lm.path).eval()
    tensors = dict(stage.named_parameters()) | dict(stage.named_buffers())
    assert not [name for name, t in tensors.items() if t.is_meta]
    checkpoint = load_file(lm.path / "model.safetensors")
    for name, p in stage.named_parameters():
        m = re.match(r"^(model\.)?layers\.(\d+)\.(.*)$", name)
        source = (
            f"model.layers.{int(m.group(2)) + start}.{m.group(3)}" if m else ("model." + name.removeprefix("model."))
        )
        source = "model.embed_tokens.weight" if name == "lm_head.weight" else source  # tied head
        assert torch.equal(p, checkpoint[source]), name  # loaded as is, not re-initialised
    base = stage.model if last else stage
    torch.testing.assert_close(base.rotary_emb.inv_freq, whole.model.rotary_emb.inv_freq, atol=0, rtol=0)
    torch.testing.assert_close(
        base.rotary_emb.original_inv_freq, whole.model.rotary_emb.original_inv_freq, atol=0, rtol=0
    )
