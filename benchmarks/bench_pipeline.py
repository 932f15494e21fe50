"""Pipeline micro-batches and the cost of moving hidden states between stages.

    python -m loadtest.bench_pipeline [--duration 15] [--rounds 2]

In one run on one machine:
1. tiny-lm in 2 stages served twice from one `serve run` (serve_config.yaml's tiny-lm-pipeline),
   once with `pipeline_microbatches: 1` (one decode step crosses the stages in turn) and once with
   2 (two groups, one in each stage): streamed completions at 16 concurrent streams, greedy,
   64 tokens, closed loop, the two alternating `--rounds` times.
2. On a local Ray instance, the engine driven from this process (no HTTP, no Generator
   replica): 16 sequences of 64 tokens through the two Stage deployments, microbatches 1 and 2
   alternating (tokens/s); one decode step through the Stage deployments (handles, hidden states
   through the object store) and through the same two stages in-process: the difference is what
   the hops and transfers cost per step. Also a bare `ray.put` + `ray.get` of one step's hidden
   states.
Not a test: nothing asserts on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

from loadtest import report, runner
from loadtest.scenarios import Completions, sentence
from tests.harness import ROOT, free_port, serve_config_on, serve_run

NICE = 15
STREAMS = 16
MAX_TOKENS = 64
MODEL = "tiny-lm-pipeline"
VARIANTS = {"pipeline_microbatches: 1": f"{MODEL}-mb1", "pipeline_microbatches: 2": f"{MODEL}-mb2"}


def pipeline_config() -> dict:
    """serve_config.yaml's tiny-lm-pipeline twice, microbatches 1 and 2, with nothing else but the ingress."""
    config = serve_config_on(free_port())
    app = config["applications"][0]
    base = next(m for m in app["args"]["models"] if m["name"] == MODEL)
    app["args"]["models"] = [{**base, "name": f"{MODEL}-mb{k}", "pipeline_microbatches": k} for k in (1, 2)]
    deployments = []
    for d in app["deployments"]:
        if d["name"] == "Ingress":
            deployments.append(d)
        elif d["name"].endswith(f"-{MODEL}"):
            deployments += [{**d, "name": f"{d['name']}-mb{k}"} for k in (1, 2)]
    app["deployments"] = deployments
    return config


def served_tokens_per_s(duration: float, warmup: float, rounds: int) -> dict[str, list[float]]:
    log_dir = ROOT / "artifacts" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    rates: dict[str, list[float]] = {label: [] for label in VARIANTS}
    with serve_run(pipeline_config(), log_dir=log_dir) as url:
        for _ in range(rounds):
            for label, model in VARIANTS.items():
                samples = asyncio.run(
                    runner.closed_loop(url, Completions(model, MAX_TOKENS), STREAMS, duration, warmup, timeout_s=120)
                )
                summary = report.summarize(samples, duration, 1, None, STREAMS, "completions")
                rates[label].append(summary["tokens_per_s"])
                print(f"{label}: {summary['tokens_per_s']} tokens/s, errors {summary['errors_by_status']}", flush=True)
    return rates


def transfer_cost(steps: int = 48) -> dict[str, float]:
    """Median ms per decode step of 16 sequences: through the Stage deployments vs in-process."""
    import ray
    import torch
    from ray import serve

    from app.config import ModelConfig
    from deployments.stage import RemoteRunner, Stage
    from models.causal_lm import CausalLM
    from models.generation import Engine
    from models.loader import resolve_source
    from models.params import SamplingParams
    from models.stages import stage_runner

    torch.set_num_threads(1)
    cfg = ModelConfig(name="bench", task="generate", source="built:tiny-lm", pipeline_stages=2, num_threads=1)
    lm = CausalLM(resolve_source(cfg.source), weights=False)

    def tokens_per_s(runners, microbatches: int) -> float:
        engine = Engine(lm, runners=runners, microbatches=microbatches)
        for i in range(STREAMS):
            engine.add(f"s{i}", lm.encode(sentence(i)), SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
        start, tokens = time.perf_counter(), 0
        while engine.has_work():
            tokens += len(engine.step())
        return tokens / (time.perf_counter() - start)

    def step_ms(runners) -> float:
        engine = Engine(lm, runners=runners)
        for i in range(STREAMS):
            engine.add(f"s{i}", lm.encode(sentence(i)), SamplingParams(max_tokens=steps + 2, temperature=0))
        engine.step()  # prefill, and the first decode launched
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)

    local = step_ms([stage_runner(lm.path, 0, 2), stage_runner(lm.path, 2, 4)])
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        handles = [
            serve.run(
                Stage.options(name=f"Stage{k}-bench").bind(cfg, k, 2 * k, 2 * k + 2),
                name=f"stage{k}",
                route_prefix=None,
            )
            for k in (0, 1)
        ]
        remote = step_ms([RemoteRunner(h) for h in handles])
        engine_rates: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(3):
            for m in engine_rates:
                engine_rates[m].append(round(tokens_per_s([RemoteRunner(h) for h in handles], m), 1))
        hidden = torch.randn(STREAMS, 1, 64)
        put_get = []
        for _ in range(200):
            start = time.perf_counter()
            ray.get(ray.put(hidden))
            put_get.append((time.perf_counter() - start) * 1000)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "in_process_ms": local,
        "through_stages_ms": remote,
        "put_get_ms": statistics.median(put_get),
        "engine_tokens_per_s": engine_rates,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.bench_pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    os.nice(NICE)
    costs = transfer_cost()
    print(f"decode step of {STREAMS} sequences, 2 stages: {costs}", flush=True)
    rates = served_tokens_per_s(args.duration, args.warmup, args.rounds)
    one, two = (statistics.mean(r) for r in rates.values())
    print(f"\ncommand: python -m loadtest.bench_pipeline {' '.join(argv or sys.argv[1:])}")
    print(
        f"tokens/s at {STREAMS} streams, mean of {args.rounds} rounds: microbatches 1: {one:.0f}, "
        f"microbatches 2: {two:.0f}, ratio {two / one:.2f} (each round: {rates})"
    )
    e1, e2 = (statistics.mean(r) for r in costs["engine_tokens_per_s"].values())
    print(
        f"engine over the 2 Stage deployments, {STREAMS} sequences x {MAX_TOKENS} tokens, mean of 3: microbatches 1: "
        f"{e1:.0f}, microbatches 2: {e2:.0f} tokens/s, ratio {e2 / e1:.2f} (each: {costs['engine_tokens_per_s']})"
    )
    print(
        f"per decode step: in-process {costs['in_process_ms']:.2f} ms, through 2 Stage deployments "
        f"{costs['through_stages_ms']:.2f} ms: hops and transfers "
        f"{costs['through_stages_ms'] - costs['in_process_ms']:.2f} ms; "
        f"ray.put + ray.get of one step's hidden states [{STREAMS}, 1, 64] fp32: {costs['put_get_ms']:.3f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
