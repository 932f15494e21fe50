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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks import NICE, peers, same_nice
from loadtest import report, runner
from loadtest.scenarios import Embeddings, sentence
from tests.harness import ROOT, free_port, serve_config_on, serve_run

MODEL = "all-MiniLM-L6-v2"
LUA = ROOT / "benchmarks" / "wrk" / "embeddings.lua"
WORKLOADS = {"single": (1, 32), "batch32": (32, 4)}  # texts per request, connections
SHIPPED = "rayinfer: serve_config.yaml"
VARIANTS = {  # name: changes to the shipped config's embedding model entry and deployments
    SHIPPED: {},
    "rayinfer: runtime torch (same fp32 numerics, transformers' forward)": {"model": {"runtime": "torch"}},
    "rayinfer: placement replica (its own Embedder deployment, one handle hop per batch)": {
        "model": {"placement": "replica"}
    },
}


def raw_limit(runtime: str, seconds: float) -> dict:
    """Texts/s of the model alone in-process, batches of 32, both cores: the ceiling for any server
    of these numerics. Best of two layouts (one batch on 2 threads; two batches at once on 1 each)."""
    from app.config import ModelConfig
    from deployments.embedder import load_model

    out = {}
    texts = [sentence(i) for i in range(4096)]
    for batches in (1, 2):
        cfg = ModelConfig(name=MODEL, task="embed", source=f"bundled:{MODEL}", runtime=runtime,
                          concurrent_batches=batches)  # fmt: skip
        model = load_model(cfg, threads=os.cpu_count() or 2)
        ids = model.tokenize(texts)
        model.embed_ids(ids[:32])
        done = [0] * batches
        stop = time.perf_counter() + seconds

        def work(k: int, model=model, ids=ids, done=done, stop=stop, batches=batches) -> None:
            n = k * 32
            while time.perf_counter() < stop:
                model.embed_ids(ids[n % 4064 : n % 4064 + 32], 32)
                done[k] += 32
                n += 32 * batches

        start = time.perf_counter()
        threads = [threading.Thread(target=work, args=(k,)) for k in range(batches)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out[f"{batches}x{(os.cpu_count() or 2) // batches} threads"] = round(
            sum(done) / (time.perf_counter() - start), 1
        )
    return {"texts_per_s": max(out.values()), "layouts": out}


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


def run_all(seconds: float, only: list[str] | None) -> dict:
    log_dir = ROOT / "artifacts" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"raw": {rt: raw_limit(rt, 10.0) for rt in ("onnx", "torch")}, "servers": {}}
    print(f"raw limits: {results['raw']}", flush=True)
    same_nice(NICE)  # after the raw measurement, which has the machine to itself
    servers = {**{name: lambda d, n=name: peers.serve(n, d) for name in peers.PEERS}}
    servers.update({name: lambda d, v=variant: rayinfer(v, d) for name, variant in VARIANTS.items()})
    for name, start in servers.items():
        if only and not any(o in name for o in only):
            continue
        with start(log_dir) as url:
            results["servers"][name] = measure(url, seconds)
        print(f"{name}: {json.dumps(results['servers'][name]['single'])}", flush=True)
    return results


def render(results: dict, command: str) -> str:
    servers = results["servers"]
    peer_names = [n for n in servers if n in peers.PEERS and n != peers.NAIVE]
    best_peer = max((servers[n]["single"]["requests_per_s"] for n in peer_names), default=None)
    raw = results["raw"]
    lines = [
        f"Measured {datetime.date.today()} by `{command}`: {os.cpu_count()} cores, CPU only, fp32, "
        f"load average before the run {results.get('load_before', '?')}.",
        "",
        f"Raw limit, in-process, batches of 32: onnx {raw['onnx']['texts_per_s']:.0f} texts/s "
        f"({raw['onnx']['layouts']}), torch {raw['torch']['texts_per_s']:.0f} ({raw['torch']['layouts']}).",
        "",
        "| server | wrk single req/s | × best peer | × raw | p50 ms | p99 ms | wrk 32-text texts/s | × raw "
        "| loadtest req/s | loadtest p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in servers.items():
        s, b, lt = r["single"], r["batch32"], r["loadtest"]
        rt = "torch" if "torch" in name or name in peers.PEERS else "onnx"
        errors = s["errors_status"] + s["errors_other"] + b["errors_status"] + b["errors_other"]
        vs_peer = f"{s['requests_per_s'] / best_peer:.2f}" if best_peer else "–"
        lines.append(
            f"| {name} | {s['requests_per_s']:.0f} | {vs_peer} | {s['texts_per_s'] / raw[rt]['texts_per_s']:.2f} "
            f"| {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | {b['texts_per_s']:.0f} "
            f"| {b['texts_per_s'] / raw[rt]['texts_per_s']:.2f} "
            f"| {lt['items_per_s']:.0f} | {lt['latency_ms']['p99']:.0f} | {errors or 'none'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__)
    p.add_argument("--duration", type=float, default=20.0, help="seconds per load")
    p.add_argument("--only", nargs="*", help="run only the servers whose name contains one of these")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "bench" / "embed.md"))
    args = p.parse_args(argv)
    command = "make bench" if os.environ.get("MAKELEVEL") else "python -m benchmarks.bench " + " ".join(sys.argv[1:])
    load_before = os.getloadavg()[0]
    results = run_all(args.duration, args.only)
    results["load_before"] = round(load_before, 2)
    text = render(results, command)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
