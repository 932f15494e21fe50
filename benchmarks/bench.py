"""`make bench`, embeddings: rayinfer against the servers a user would pick instead, side by side
in one run on one machine, and against the model's raw in-process limit.

Servers: the naive peer (benchmarks/naive_peer.py), LitServe and Infinity (each in its own venv under
artifacts/peers/, built by benchmarks/peers.py, never in the project's), and rayinfer's variants
(the shipped serve_config.yaml, and one switch changed each). Loads: `wrk` (C; a Lua script for the
body: benchmarks/wrk/embeddings.lua) at concurrency 32 with one short text per request, then 32
texts per request at concurrency 4; and the project's own load generator (python -m loadtest) at
concurrency 32. Every process runs at nice 15, Ray's workers included (benchmarks/__init__.py): a
load generator above the servers on the same cores would starve them. Not a test: nothing asserts
on speed. Writes artifacts/bench/embed.{md,json}.

This VM's speed drifts by 10-25% from minute to minute (the raw model alone, 5 s windows: 396-461
texts/s), more than the differences measured. So every server runs `--rounds` times (default 3), the
servers taking turns within each round, and the table gives each server's median over its rounds,
with every round's figure beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

from benchmarks import NICE, peers, same_nice
from loadtest import report, runner
from loadtest.scenarios import Embeddings
from tests.harness import ROOT, free_port, serve_config_on, serve_run

MODEL = "all-MiniLM-L6-v2"
LUA = ROOT / "benchmarks" / "wrk" / "embeddings.lua"
WORKLOADS = {"single": (1, 32), "batch32": (32, 4)}  # texts per request, connections
SHIPPED = "rayinfer: serve_config.yaml"
VARIANTS = {  # name: changes to the shipped config's embedding model entry and deployments
    SHIPPED: {},
    "rayinfer: runtime onnx (float32 on ONNX Runtime)": {"model": {"runtime": "onnx"}},
    "rayinfer: runtime torch (float32, transformers' forward: the peers' numerics)": {"model": {"runtime": "torch"}},
    "rayinfer: placement replica (its own Embedder deployment, one handle hop per batch)": {
        "model": {"placement": "replica"}
    },
}
# How each computes: (runtime, autocast), the raw limit each server is compared with. The shipped config's
# `runtime: auto` is resolved as a replica on this machine resolves it (models/embedding.py).
NUMERICS = {"onnx fp32": ("onnx", None), "torch fp32": ("torch", None), "torch bf16 matmuls": ("torch", "bfloat16")}


def numerics_of(name: str) -> str:
    """The NUMERICS key a server computes with: the peers torch's float32; a rayinfer variant its config's
    runtime and autocast, as a replica on this machine resolves them."""
    if name in peers.PEERS:
        return "torch fp32"
    import torch

    from app.config import ModelConfig
    from models.embedding import resolve_runtime

    cfg = ModelConfig.model_validate(rayinfer_config(VARIANTS[name])["applications"][0]["args"]["models"][0])
    resolved = resolve_runtime(cfg.runtime, cfg.autocast, torch.device("cpu"))
    return next(k for k, v in NUMERICS.items() if v == resolved)


WRK_WORDS = ("serving", "model", "online", "batch", "replica", "latency", "queue", "token",
             "request", "vector", "cluster", "node", "throughput", "capacity", "deploy", "scale")  # fmt: skip


def wrk_texts(texts_per_request: int = 32) -> list[str]:
    """The texts benchmarks/wrk/embeddings.lua sends (its bodies for TEXTS = 32), in Python."""
    out = []
    for i in range(1, 513):
        for j in range(1, texts_per_request + 1):
            k = i * 31 + j * 7
            words = (WRK_WORDS[k % 16], WRK_WORDS[(k * 3) % 16], WRK_WORDS[(k * 5) % 16])
            out.append(f"Request {k} asks about {words[0]} and {words[1]} near the {words[2]}.")
    return out


@mock.patch.dict(os.environ)  # the tokenizer setting stays in here
def raw_limit(numerics: str, seconds: float) -> dict:
    """Texts/s of the model alone in-process, batches of 32 of the texts wrk sends, both cores: the
    ceiling for any server of these numerics (a NUMERICS key). Best of two layouts (one batch on 2
    threads; two batches at once on 1 each), on token ids tokenized beforehand (`forward`); then, in the
    best layout, texts to vectors (`texts_per_s`: each batch tokenized by the model's tokenizer, then
    embedded), what an in-process caller of a text embedding model gets and the limit a server of texts
    is compared with. The tokenizer runs on the calling thread, as in rayinfer's replicas
    (models/fast_tokens.single_threaded; faster here too); the peers started after this keep their own
    default (the environment is restored when this returns)."""
    from app.config import ModelConfig
    from deployments.embedder import load_model

    runtime, autocast = NUMERICS[numerics]
    cores = os.cpu_count() or 2
    rates, models = {}, {}  # by batches at once
    texts = wrk_texts()[:4096]
    for batches in (1, 2):
        cfg = ModelConfig(name=MODEL, task="embed", source=f"bundled:{MODEL}", runtime=runtime,
                          autocast=autocast, concurrent_batches=batches)  # fmt: skip
        model = models[batches] = load_model(cfg, threads=cores)
        ids = model.tokenize(texts)
        model.embed_ids(ids[:32])
        rates[batches] = _raw_rate(lambda n, m=model, ids=ids: m.embed_ids(ids[n : n + 32], 32), batches, seconds)
    best = max(rates, key=rates.__getitem__)
    model = models[best]

    def from_texts(n: int) -> None:
        model.embed_ids(model.tokenize(texts[n : n + 32]), 32)

    layouts = {f"{b}x{cores // b} threads": rate for b, rate in rates.items()}
    return {"texts_per_s": _raw_rate(from_texts, best, seconds), "forward": rates[best], "layouts": layouts}


def _raw_rate(embed: Callable[[int], object], batches: int, seconds: float) -> float:
    """Texts/s of `embed(n)` (32 texts from offset n) on `batches` threads at once for `seconds`."""
    done = [0] * batches
    stop = time.perf_counter() + seconds

    def work(k: int) -> None:
        n = k * 32
        while time.perf_counter() < stop:
            embed(n % 4064)
            done[k] += 32
            n += 32 * batches

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(batches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return round(sum(done) / (time.perf_counter() - start), 1)


def wrk(url: str, texts: int, connections: int, seconds: float) -> dict:
    """One wrk run; its Lua `done` prints a JSON line with the counts and percentiles."""
    cmd = ["nice", "-n", str(NICE), "wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds:.0f}s",
           "--timeout", "30s", "-s", str(LUA), f"{url}/v1/embeddings", "--", MODEL, str(texts)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    stats = json.loads(next(line[5:] for line in out.splitlines() if line.startswith("JSON ")))
    stats["requests_per_s"] = stats["requests"] / (stats["duration_us"] / 1e6)
    stats["texts_per_s"] = stats["requests_per_s"] * texts
    return stats


def own_load(url: str, seconds: float) -> dict:
    """The project's load generator (python -m loadtest), closed loop, 32 in flight, one text each."""
    samples = asyncio.run(runner.closed_loop(url, Embeddings(MODEL, 1), 32, seconds, 3.0, timeout_s=60))
    return report.summarize(samples, seconds, 1, None, 32, "embeddings")


def measure(url: str, seconds: float) -> dict:
    wrk(url, 1, 32, 3)  # warm-up: batch shapes, thread pools, allocator
    result = {name: wrk(url, texts, conns, seconds) for name, (texts, conns) in WORKLOADS.items()}
    result["loadtest"] = own_load(url, seconds)
    return result


def rayinfer_config(variant: dict) -> dict:
    """The shipped config with only the unsplit embedding model (the others would idle beside it)."""
    config = serve_config_on(free_port())
    app = config["applications"][0]
    app["args"]["models"] = [
        {**m, **variant.get("model", {})}
        for m in app["args"]["models"]
        if m["task"] == "embed" and m.get("pipeline_stages", 1) == 1
    ]
    placed_in_ingress = app["args"]["models"][0].get("placement") == "ingress"
    keep = {"Ingress"} | ({f"Embedder-{MODEL}"} if not placed_in_ingress else set())
    app["deployments"] = [copy.deepcopy(d) for d in app["deployments"] if d["name"] in keep]
    return config


@contextlib.contextmanager
def rayinfer(variant: dict, log_dir: Path) -> Iterator[str]:
    with serve_run(rayinfer_config(variant), log_dir=log_dir) as url:
        yield url


def run_all(seconds: float, only: list[str] | None, rounds: int) -> dict:
    log_dir = ROOT / "artifacts" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"rounds": [], "raw_rounds": []}
    servers = {**{name: lambda d, n=name: peers.serve(n, d) for name in peers.PEERS}}
    servers.update({name: lambda d, v=variant: rayinfer(v, d) for name, variant in VARIANTS.items()})
    chosen = {name: start for name, start in servers.items() if not only or any(o in name for o in only)}
    kinds = sorted({numerics_of(name) for name in chosen})
    results["numerics"] = {name: numerics_of(name) for name in servers}

    def raw_limits(k: int) -> None:
        results["raw_rounds"].append({kind: raw_limit(kind, 10.0) for kind in kinds})
        print(f"round {k + 1}, raw limits: {results['raw_rounds'][-1]}", flush=True)

    for k in range(rounds):
        same_nice(NICE)
        measured: dict = {}
        for name, start in chosen.items():
            # The raw limit right before rayinfer's servers (the peers run first), not at the round's start:
            # this VM's speed drifts, once 2.5x within a run, and a round lasts ~15 minutes. No server runs
            # while it is measured: it has the machine to itself.
            if name in VARIANTS and len(results["raw_rounds"]) == k:
                raw_limits(k)
            with start(log_dir) as url:
                measured[name] = measure(url, seconds)
            print(f"round {k + 1}, {name}: {json.dumps(measured[name]['single'])}", flush=True)
        if len(results["raw_rounds"]) == k:  # only peers chosen
            raw_limits(k)
        results["rounds"].append(measured)
    results["servers"] = {name: median_run(results["rounds"], name) for name in results["rounds"][0]}
    results["raw"] = {
        kind: {
            "texts_per_s": statistics.median(r[kind]["texts_per_s"] for r in results["raw_rounds"]),
            "runs": [r[kind]["texts_per_s"] for r in results["raw_rounds"]],
            "forward": statistics.median(r[kind]["forward"] for r in results["raw_rounds"]),
            "forward_runs": [r[kind]["forward"] for r in results["raw_rounds"]],
        }
        for kind in kinds
    }
    return results


def median_run(rounds: list[dict], name: str) -> dict:
    """Each load's figures for one server: the median over the rounds of each, and every round's rate."""
    out: dict = {}
    for load, rate in (("single", "requests_per_s"), ("batch32", "texts_per_s"), ("loadtest", "items_per_s")):
        runs = [r[name][load] for r in rounds]
        if load == "loadtest":
            p99s = [x["latency_ms"]["p99"] for x in runs]
            out[load] = {rate: statistics.median(x[rate] for x in runs), "latency_ms": {"p99": statistics.median(p99s)}}
        else:
            out[load] = {
                key: statistics.median(x[key] for x in runs) for key in (rate, "requests_per_s", "p50_ms", "p99_ms")
            }
            out[load]["errors"] = sum(x["errors_status"] + x["errors_other"] for x in runs)
        out[load]["runs"] = [round(x[rate], 1) for x in runs]
    return out


def _rounds(rates: list[float]) -> str:
    return ", ".join(f"{x:.0f}" for x in rates)


def batch32_cell(b: dict, raw: dict) -> str:
    """The 32-text cells (texts/s with each round's, × raw texts to vectors, × the forward alone); a server
    that refused them gets no rate."""
    if b["errors"]:  # wrk counts an error response as a request: its rate would count refused texts
        return f"({b['errors']:,} errors) | – | –"
    rate = b["texts_per_s"]
    return f"{rate:.0f} ({_rounds(b['runs'])}) | {rate / raw['texts_per_s']:.2f} | {rate / raw['forward']:.2f}"


def render(results: dict, command: str) -> str:
    servers, rounds = results["servers"], results["rounds"]
    peer_names = [n for n in servers if n in peers.PEERS and n != peers.NAIVE]
    best_peer = max((servers[n]["single"]["requests_per_s"] for n in peer_names), default=None)
    raw = results["raw"]
    lines = [
        f"Measured {datetime.date.today()} by `{command}`: {os.cpu_count()} cores ({cpu_model()}), CPU only, "
        f"load average before the run {results.get('load_before', '?')}; {len(rounds)} rounds, the servers "
        "taking turns in each; every figure is the server's median over the rounds, each round's rate in ().",
        "",
        "Raw limit, in-process, batches of 32, both cores (the better of one batch on two threads and two "
        "at once on one each), measured in each round after the peers, right before rayinfer's servers, "
        'texts to vectors (each batch tokenized, then embedded: what an in-process caller gets; the "× raw" '
        'columns) and the forward alone on ids tokenized beforehand ("× fwd"): '
        + "; ".join(
            f"{kind} {r['texts_per_s']:.0f} texts/s ({_rounds(r['runs'])}), forward alone {r['forward']:.0f} "
            f"({_rounds(r['forward_runs'])})"
            for kind, r in raw.items()
        )
        + ".",
        "",
        "| server | numerics | wrk single req/s (rounds) | × best peer | × raw | p50 ms | p99 ms | wrk 32-text "
        "texts/s (rounds) | × raw | × fwd | loadtest req/s | loadtest p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in servers.items():
        s, b, lt = r["single"], r["batch32"], r["loadtest"]
        kind = results["numerics"][name]
        errors = s["errors"] + b["errors"]
        vs_peer = f"{s['requests_per_s'] / best_peer:.2f}" if best_peer else "–"
        lines.append(
            f"| {name} | {kind} | {s['requests_per_s']:.0f} ({_rounds(s['runs'])}) | {vs_peer} "
            f"| {s['requests_per_s'] / raw[kind]['texts_per_s']:.2f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} "
            f"| {batch32_cell(b, raw[kind])} "
            f"| {lt['items_per_s']:.0f} | {lt['latency_ms']['p99']:.0f} | {errors or 'none'} |"
        )
    if SHIPPED in servers and peer_names:
        per_round = [
            r[SHIPPED]["single"]["requests_per_s"] / max(r[n]["single"]["requests_per_s"] for n in peer_names)
            for r in rounds
            if SHIPPED in r and all(n in r for n in peer_names)
        ]
        lines += [
            "",
            f"Shipped config against the best peer of the same round: {', '.join(f'{x:.2f}x' for x in per_round)}.",
        ]
    return "\n".join(lines) + "\n"


def cpu_model() -> str:
    """The CPU's name and whether it multiplies bfloat16 natively (what `runtime: auto` chooses by)."""
    from models.embedding import native_bf16

    name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")), "CPU")  # fmt: skip
    return f"{name}, {'native bfloat16' if native_bf16() else 'no native bfloat16'}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__)
    p.add_argument("--duration", type=float, default=20.0, help="seconds per load")
    p.add_argument("--only", nargs="*", help="run only the servers whose name contains one of these")
    p.add_argument("--rounds", type=int, default=3, help="times each server is measured, taking turns (median)")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "bench" / "embed.md"))
    args = p.parse_args(argv)
    command = "make bench" if os.environ.get("MAKELEVEL") else "python -m benchmarks.bench " + " ".join(sys.argv[1:])
    load_before = os.getloadavg()[0]
    results = run_all(args.duration, args.only, args.rounds)
    results["load_before"] = round(load_before, 2)
    text = render(results, command)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
