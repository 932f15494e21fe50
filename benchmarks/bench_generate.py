"""`make bench`, generation half: tokens/s of continuous batching against one-at-a-time `generate`.

In one run on one machine: (1) the baseline, a loop calling Hugging Face `generate` on one
request at a time, in-process, with the machine to itself; (2) rayinfer serving the same
model (`serve_config.yaml`, generation model only), streamed completions at several
concurrencies, the load generator at nice 15 beside Ray's workers. Same prompts, greedy,
`max_tokens` 64 each; tokens are counted from each response's `usage`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from loadtest import report, runner
from loadtest.scenarios import Completions, sentence
from tests.harness import ROOT, free_port, serve_config_on, serve_run

NICE = 15
MAX_TOKENS = 64
MODEL = "tiny-lm"
VARIANTS = [  # (label, model args over serve_config.yaml's, concurrency levels)
    ("serve_config.yaml", {}, (1, 8, 16, 32)),
    ("stream_interval_s: 0 (one chunk per decode step)", {"stream_interval_s": 0.0}, (16,)),
]


def sequential_generate(seconds: float) -> dict:
    """Tokens/s of `generate` called on one request at a time (the best of 1 and all threads)."""
    import torch

    from models.causal_lm import CausalLM
    from models.loader import resolve_source

    lm = CausalLM(resolve_source(f"built:{MODEL}"))
    best = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        tokens, i, start = 0, 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            ids = lm.encode(sentence(i))
            with torch.inference_mode():
                out = lm.model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=MAX_TOKENS,
                    do_sample=False,
                    pad_token_id=lm.tokenizer.pad_token_id,
                )
            tokens += out.shape[1] - len(ids)
            i += 1
        rate = tokens / (time.perf_counter() - start)
        if rate > best.get("tokens_per_s", 0):
            best = {"tokens_per_s": round(rate, 1), "threads": threads, "requests": i}
    return best


def generation_only_config(**model_args) -> dict:
    config = serve_config_on(free_port())
    app = config["applications"][0]
    app["args"]["models"] = [
        {**m, **model_args} for m in app["args"]["models"] if m["task"] == "generate" and m["name"] == MODEL
    ]
    app["deployments"] = [d for d in app["deployments"] if d["name"] in ("Ingress", f"Generator-{MODEL}")]
    return config


def run_all(duration: float, warmup: float) -> dict:
    log_dir = ROOT / "artifacts" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    results = {"sequential": sequential_generate(duration / 2), "rayinfer": {}}
    print(f"sequential generate: {results['sequential']}", flush=True)
    os.nice(NICE)
    scenario = Completions(MODEL, MAX_TOKENS)
    for label, model_args, levels in VARIANTS:
        with serve_run(generation_only_config(**model_args), log_dir=log_dir) as url:
            for c in levels:
                samples = asyncio.run(runner.closed_loop(url, scenario, c, duration, warmup, timeout_s=120))
                results["rayinfer"][f"{label}|{c}"] = report.summarize(samples, duration, 1, None, c, "completions")
                print(
                    f"{label}, {c} streams: {results['rayinfer'][f'{label}|{c}']['tokens_per_s']} tokens/s", flush=True
                )
    return results


def render(results: dict, command: str) -> str:
    base = results["sequential"]["tokens_per_s"]
    lines = [
        f"Baseline (`generate` on one request at a time, in-process, {results['sequential']['threads']} "
        f"torch thread(s), greedy, max_new_tokens {MAX_TOKENS}): **{base} tokens/s**.",
        "",
        f"rayinfer: streamed `/v1/completions` (greedy, max_tokens {MAX_TOKENS}), closed loop, load generator "
        f"at nice {NICE} on the same cores. Command: `{command}`.",
        "",
        "| config | concurrent streams | tokens/s | × sequential generate | TTFT p50 ms | TTFT p99 ms "
        "| chunk gap p50 ms | chunk gap p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results["rayinfer"].items():
        label, c = key.rsplit("|", 1)
        ttft, itl = r["ttft_ms"] or {}, r["itl_ms"] or {}
        lines.append(
            f"| {label} | {c} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f} | {ttft.get('p50', 0):.0f} "
            f"| {ttft.get('p99', 0):.0f} | {itl.get('p50', 0):.1f} | {itl.get('p99', 0):.1f} "
            f"| {r['errors_by_status'] or 'none'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_generate", description=__doc__)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--out", default=str(ROOT / "artifacts" / "bench" / "generate.md"))
    args = p.parse_args(argv)
    command = (
        "make bench"
        if os.environ.get("MAKELEVEL")
        else "python -m loadtest.bench_generate " + " ".join(argv or sys.argv[1:])
    )
    results = run_all(args.duration, args.warmup)
    text = render(results, command)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
