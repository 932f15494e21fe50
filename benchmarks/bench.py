"""`make bench`: the side-by-side embeddings benchmark, written to BENCHMARKS.md.

In one run on one machine: (1) the model's raw batched throughput in-process (the limit),
(2) the naive peer (loadtest/naive_peer.py), (3) rayinfer in several configurations, each on
single-text requests at concurrency 32 and 32-text requests at concurrency 4.

Every server and the load generator run at nice 15: Ray's workers do, and a load generator at
nice 0 on the same cores would starve them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from loadtest import report, runner
from loadtest.scenarios import Embeddings, sentence
from tests.harness import ROOT, free_port, serve_config_on, serve_run, stop, wait_ready

NICE = 15
WORKLOADS = {"single": dict(texts=1, concurrency=32), "batch32": dict(texts=32, concurrency=4)}

VARIANTS = {
    "rayinfer, default config": dict(),
    "rayinfer, default but edge batching off (one handle hop per request)": dict(args={"edge_batching": False}),
    "rayinfer, default but Serve's Python proxy (no HAProxy)": dict(env={"RAY_SERVE_ENABLE_HA_PROXY": "0"}),
    "rayinfer, default but OpenMP threads spin (no OMP_WAIT_POLICY=PASSIVE)": dict(
        deployments={"Embedder-all-MiniLM-L6-v2": {"ray_actor_options": {"num_cpus": 2}}}
    ),
}


def raw_limit(seconds: float) -> dict:
    """Texts/s of the model alone, batches of 32, all cores: the ceiling for any server."""
    import torch

    from models.embedding import EmbeddingModel
    from models.loader import resolve_source

    torch.set_num_threads(os.cpu_count() or 1)
    model = EmbeddingModel(resolve_source("bundled:all-MiniLM-L6-v2"))
    ids = model.tokenize([sentence(i) for i in range(4096)])
    model.embed_ids(ids[:32])
    rounds = []
    for _ in range(3):  # best of three: the limit is what the model can do, not a noisy moment
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            model.embed_ids(ids[n % 4064 : n % 4064 + 32], 32)
            n += 32
        rounds.append(n / (time.perf_counter() - start))
    return {
        "texts_per_s": round(max(rounds), 1),
        "rounds": [round(r, 1) for r in rounds],
        "threads": torch.get_num_threads(),
    }


def load(url: str, workload: str, duration: float, warmup: float) -> dict:
    w = WORKLOADS[workload]
    scenario = Embeddings("all-MiniLM-L6-v2", w["texts"])
    samples = asyncio.run(runner.closed_loop(url, scenario, w["concurrency"], duration, warmup, timeout_s=60))
    return report.summarize(samples, duration, w["texts"], None, w["concurrency"], "embeddings")


@contextlib.contextmanager
def naive_peer(log_dir: Path):
    port = free_port()
    log_path = log_dir / "naive.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            ["nice", "-n", str(NICE), sys.executable, "-m", "loadtest.naive_peer", str(port)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/readyz", proc, log_path)
        yield url
    finally:
        stop(proc)


def rayinfer_config(variant: dict) -> dict:
    config = serve_config_on(free_port())
    app = config["applications"][0]
    app["args"] = {**app["args"], **variant.get("args", {})}
    # The unsplit embedding model alone: the other models' replicas would idle beside it.
    app["args"]["models"] = [
        {**m, **variant.get("model", {})}
        for m in app["args"]["models"]
        if m["task"] == "embed" and m.get("pipeline_stages", 1) == 1
    ]
    keep = {"Ingress"} | {f"Embedder-{m['name']}" for m in app["args"]["models"]}
    app["deployments"] = [d for d in app["deployments"] if d["name"] in keep]
    for d in app["deployments"]:
        d.update(copy.deepcopy(variant.get("deployments", {}).get(d["name"], {})))
    return config


def run_all(duration: float, warmup: float, only: list[str] | None) -> dict:
    log_dir = ROOT / "artifacts" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    results = {"raw": raw_limit(10.0), "servers": {}}
    os.nice(NICE)  # after the raw measurement, which has the machine to itself
    print(f"raw limit: {results['raw']}", flush=True)
    with naive_peer(log_dir) as url:
        results["servers"]["naive peer (FastAPI + uvicorn, one call per request)"] = {
            w: load(url, w, duration, warmup) for w in WORKLOADS
        }
    for name, variant in VARIANTS.items():
        if only and not any(o in name for o in only):
            continue
        with serve_run(rayinfer_config(variant), env=variant.get("env"), log_dir=log_dir) as url:
            results["servers"][name] = {w: load(url, w, duration, warmup) for w in WORKLOADS}
        print(f"{name}: done", flush=True)
    return results


def render(results: dict, command: str) -> str:
    raw = results["raw"]["texts_per_s"]
    naive_single = next(iter(results["servers"].values()))["single"]["items_per_s"]
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    lines = [
        "# Benchmarks",
        "",
        f"Measured {datetime.date.today()} by `{command}` on {os.cpu_count()} cores ({cpu}), "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, CPU only, fp32.",
        "",
        f"Raw limit (the model alone in-process, batches of 32, {results['raw']['threads']} threads): "
        f"**{raw} texts/s**.",
        "",
        "All servers and the load generator run at nice 15 (Ray's workers do; a generator at nice 0",
        "would starve them). Closed loop; single = 1 text per request at concurrency 32; batch32 = 32",
        "texts per request at concurrency 4. Ratios are texts/s over the raw limit and over the naive peer.",
        "",
        "| server | single: texts/s | × raw | × naive | p50 ms | p99 ms "
        "| batch32: texts/s | × raw | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["servers"].items():
        s, b = r["single"], r["batch32"]
        errors = {**s["errors_by_status"], **b["errors_by_status"]} or "none"
        lines.append(
            f"| {name} | {s['items_per_s']:.0f} | {s['items_per_s'] / raw:.2f} | {s['items_per_s'] / naive_single:.2f} "
            f"| {s['latency_ms']['p50']:.0f} | {s['latency_ms']['p99']:.0f} | {b['items_per_s']:.0f} "
            f"| {b['items_per_s'] / raw:.2f} | {b['latency_ms']['p50']:.0f} | {b['latency_ms']['p99']:.0f} | {errors} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--only", nargs="*", help="run only the rayinfer variants whose name contains one of these")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "bench" / "bench.md"))
    args = p.parse_args(argv)
    command = (
        "make bench" if os.environ.get("MAKELEVEL") else "python -m loadtest.bench " + " ".join(argv or sys.argv[1:])
    )
    results = run_all(args.duration, args.warmup, args.only)
    text = render(results, command)
    Path(args.out).write_text(text)
    (Path(args.out).with_suffix(".json")).write_text(__import__("json").dumps(results, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
