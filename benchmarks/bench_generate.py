"""`make bench`, generation half: rayinfer against vLLM's own OpenAI server, same model, side by side.

In one run on one machine, one after the other: (1) vLLM's OpenAI server
(`python -m vllm.entrypoints.openai.api_server`) on the default generation model's checkpoint with
the engine arguments rayinfer's Generator builds from serve_config.yaml (same dtype, context, batch
size, KV cache, executor, threads); (2) rayinfer (`serve run` of serve_config.yaml, generation model
only). For context, two more runs of vLLM's server: with vLLM's own choice of executor and threads
(`vllm serve` without rayinfer's two settings: on CPU a worker process on one thread beside an engine
core that busy-polls it), and with every core computing in the engine core (the most vLLM alone gets
from this machine). Every process of each, and the load generator, at nice 15
(benchmarks/__init__.py: Ray's workers too).
The same client sends streamed greedy `/v1/completions` of exactly MAX_TOKENS tokens each
(`ignore_eos`), closed loop, at 1, 16 and 32 concurrent streams. Reported: tokens/s (each
response's `usage`, over the span from the first measured request sent to the last answered), time
to first token, time per output token after the first (TPOT: what the client sees as inter-token
latency, whatever the chunking), p50 and p99; and the resident memory (RSS) of every process of
each server under load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import yaml

from benchmarks import NICE, same_nice
from loadtest import report, runner
from loadtest.scenarios import Completions
from tests.harness import ROOT, end, free_port, launch, serve_config_on, serve_run, wait_ready

MAX_TOKENS = 64
LEVELS = (1, 16, 32)

# vLLM's OpenAI server runs: the engine arguments and environment rayinfer's Generator uses ("same"),
# vLLM's own executor and threads ("own"), or the same with OMP_NUM_THREADS = every core ("all_cores").
VLLM_RUNS = {
    "same": "vLLM OpenAI server, rayinfer's engine arguments",
    "own": "vLLM OpenAI server, its own executor and threads",
    "all_cores": "vLLM OpenAI server, every core in its engine core",
}


def default_model() -> dict:
    """serve_config.yaml's first generation model, as its args give it."""
    app = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    return next(m for m in app["args"]["models"] if m["task"] == "generate")


def generator_threads(model: dict) -> int:
    """The threads the Generator's engine computes on: the model's num_threads, else OMP_NUM_THREADS as
    Ray sets it for the replica, its num_cpus (serve_config.yaml's override, else the deployment's 1)."""
    if model.get("num_threads"):
        return int(model["num_threads"])
    app = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    name = f"Generator-{model['name']}"
    override = next((d for d in app.get("deployments", []) if d["name"] == name), {})
    return max(1, int(override.get("ray_actor_options", {}).get("num_cpus", 1)))


def generation_only_config(model: dict) -> dict:
    config = serve_config_on(free_port())
    app = config["applications"][0]
    app["args"]["models"] = [model]
    app["deployments"] = [d for d in app["deployments"] if d["name"] in ("Ingress", f"Generator-{model['name']}")]
    return config


@contextlib.contextmanager
def vllm_server(model: dict, log_dir: Path, run: str = "same") -> Iterator[tuple[str, int]]:
    """vLLM's OpenAI server, one of VLLM_RUNS (by default the engine arguments and environment
    rayinfer's Generator uses); yields (URL, pid)."""
    from app.config import ModelConfig
    from models.loader import resolve_source
    from models.vllm_engine import engine_env, engine_kwargs

    cfg = ModelConfig.model_validate(model)
    # Explicit: without OMP_NUM_THREADS vLLM means to cut torch to 1 thread, but on CPU its worker has
    # already disabled torch.set_num_threads, so the engine keeps one thread per core.
    threads = os.cpu_count() if run == "all_cores" else generator_threads(model)
    cfg = cfg.model_copy(update={"num_threads": threads})
    kwargs = engine_kwargs(cfg, resolve_source(cfg.source))
    env = {**os.environ, **engine_env(cfg)}
    if run == "own":
        kwargs.pop("distributed_executor_backend", None)
        env.pop("OMP_NUM_THREADS", None)
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        kwargs.pop("model"),
        "--served-model-name",
        cfg.name,
    ]
    kwargs.pop("enable_log_requests", None)
    kwargs.pop("disable_log_stats", None)
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        else:
            args += [flag, str(value)]
    log_path = log_dir / f"vllm_server_{run}.log"
    with log_path.open("w") as log:
        proc = launch(["nice", "-n", str(NICE), *args], env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/health", proc, log_path, timeout_s=900)  # minutes at nice 15 on a loaded machine
        yield url, proc.pid
    finally:
        end(proc)


def rss_mib(root_pid: int | None = None, match: str | None = None) -> float:
    """Resident memory of a process tree (root_pid), or of every process whose command line has `match`."""
    procs = []
    if root_pid is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(root_pid)
            procs = [root, *root.children(recursive=True)]
    else:
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if match in " ".join(p.info["cmdline"] or ()):
                    procs.append(p)
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return round(total / 2**20, 1)


def tokens_per_s(samples: list[runner.Sample]) -> float:
    """Tokens of the requests sent after warm-up over the span from the first of them sent to the last
    answered. Not over the nominal duration: a request of 64 tokens takes seconds, so whole requests
    counted in a fixed window quantize the rate (at 1 stream, one request more or less is 12%)."""
    ok = [s for s in samples if not s.warmup and s.outcome.status == "200"]
    if not ok:
        return 0.0
    span = max(s.t + s.latency_s for s in ok) - min(s.t for s in ok)
    return round(sum(s.outcome.tokens for s in ok) / span, 2) if span > 0 else 0.0


def measure(url: str, model: str, duration: float, warmup: float, memory) -> dict:
    out = {}
    scenario = Completions(model, MAX_TOKENS, ignore_eos=True)
    for c in LEVELS:
        samples = asyncio.run(runner.closed_loop(url, scenario, c, duration, warmup, timeout_s=120))
        out[c] = report.summarize(samples, duration, 1, None, c, "completions")
        out[c]["tokens_per_s"] = tokens_per_s(samples)
        out[c]["rss_mib"] = memory()
        out[c]["load_avg"] = [round(x, 2) for x in os.getloadavg()]
        print(
            f"  {c} streams: {out[c]['tokens_per_s']} tokens/s, TTFT p50 {(out[c]['ttft_ms'] or {}).get('p50')} ms",
            flush=True,
        )
    return out


def run_all(duration: float, warmup: float) -> dict:
    log_dir = ROOT / "artifacts" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    model = default_model()
    same_nice(NICE)
    results = {"model": model, "max_tokens": MAX_TOKENS}
    for run, name in VLLM_RUNS.items():
        print(f"{name}:", flush=True)
        with vllm_server(model, log_dir, run) as (url, pid):
            results[f"vllm_{run}"] = measure(url, model["name"], duration, warmup, lambda: rss_mib(root_pid=pid))
    print("rayinfer:", flush=True)
    config_path = log_dir / "serve_config.yaml"  # where serve_run writes the config it runs
    with serve_run(generation_only_config(model), log_dir=log_dir) as url:
        results["rayinfer"] = measure(url, model["name"], duration, warmup, lambda: rayinfer_rss(config_path))
    print("rayinfer, the whole default serve_config.yaml (idle, after start):", flush=True)
    with serve_run(serve_config_on(free_port()), log_dir=log_dir):
        results["default_config_rss_mib"] = rayinfer_rss(config_path)
    return results


def rayinfer_rss(config_path: Path) -> float:
    """RSS of the `serve run` of `config_path` and every process under it (Ray's GCS, raylet, workers,
    the replicas and vLLM's engine processes): that cluster only, whatever else runs on the machine."""
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = p.info["cmdline"] or []
            if str(config_path) in cmd and any(c.endswith("serve") for c in cmd):
                return rss_mib(root_pid=p.pid)
    return 0.0


def render(results: dict, command: str) -> str:
    m = results["model"]
    lines = [
        f"{m['name']} ({m.get('dtype', 'auto')}), streamed greedy `/v1/completions` of {results['max_tokens']} "
        f"tokens each (`ignore_eos`), closed loop, the same client for both; servers and load generator at "
        f"nice {NICE}. Command: `{command}`.",
        "",
        "| server | streams | tokens/s | × vLLM (same arguments) | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms "
        "| TPOT p99 ms | RSS MiB | errors | load avg (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {f"vllm_{run}": name for run, name in VLLM_RUNS.items()} | {"rayinfer": "rayinfer"}
    for server, name in names.items():
        for c, r in results[server].items():
            base = results["vllm_same"][c]["tokens_per_s"] or 1
            ttft, tpot = r["ttft_ms"] or {}, r["tpot_ms"] or {}
            lines.append(
                f"| {name} | {c} | {r['tokens_per_s']:.1f} "
                f"| {r['tokens_per_s'] / base:.2f} | {ttft.get('p50', 0):.0f} | {ttft.get('p99', 0):.0f} "
                f"| {tpot.get('p50', 0):.1f} | {tpot.get('p99', 0):.1f} | {r['rss_mib']:.0f} "
                f"| {r['errors_by_status'] or 'none'} | {r['load_avg'][0]} |"
            )
    lines += [
        "",
        f"The whole default serve_config.yaml (every model it names), idle after start: "
        f"{results['default_config_rss_mib']:.0f} MiB resident.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_generate", description=__doc__)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--out", default=str(ROOT / "artifacts" / "bench" / "generate.md"))
    args = p.parse_args(argv)
    command = (
        "make bench"
        if os.environ.get("MAKELEVEL")
        else "python -m benchmarks.bench_generate " + " ".join(argv or sys.argv[1:])
    )
    results = run_all(args.duration, args.warmup)
    text = render(results, command)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
