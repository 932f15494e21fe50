"""What `make serve` takes from a clean start: seconds until /readyz says ready, and the memory of
every process of the run (the `serve run` process and all it started: Ray's GCS, raylet, dashboard,
workers, replicas, HAProxy), and the CPU seconds they used, measured once ready. On a busy machine
the seconds to ready grow with the load; the CPU seconds do not.

    python -m benchmarks.startup                 # serve_config.yaml, and with the pipeline demos; 3 runs each

Each run is a new Ray cluster (`serve run`, as `make serve` does, on free ports). Memory is given as
the sum of every process's RSS (what `ps` shows; pages shared between processes count once per
process) and as the sum of PSS (shared pages divided among their processes: what the run takes).
Not a test; README "Quick start" quotes it. Writes artifacts/bench/startup.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import psutil

from tests.harness import ROOT, free_port, serve_config_on, serve_run_process, with_pipelines

CONFIGS = {
    "default": lambda: serve_config_on(free_port()),  # serve_config.yaml
    "with-pipelines": lambda: with_pipelines(serve_config_on(free_port())),  # + serve_config.pipeline.yaml
}


def usage(pid: int) -> tuple[int, float, float, float]:
    """(processes, RSS GiB summed, PSS GiB summed, CPU seconds summed) of `pid` and all its descendants.
    CPU seconds: what starting took in work, whatever else the machine was running meanwhile."""
    root = psutil.Process(pid)
    rss = pss = cpu = 0.0
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            info, times = p.memory_full_info(), p.cpu_times()
        except psutil.Error:
            continue
        rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
        cpu += times.user + times.system + times.children_user + times.children_system
    return len(procs), rss / 2**30, pss / 2**30, cpu


def one_run(make_config, log_dir: Path) -> dict:
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    # A loaded machine can take minutes: this measures, it does not judge.
    with serve_run_process(make_config(), log_dir=log_dir, ready_timeout_s=1200) as (_, proc):
        ready_s = time.monotonic() - start  # serve_run_process returns once /readyz answered 200
        n, rss, pss, cpu = usage(proc.pid)
    return {"ready_s": ready_s, "cpu_s": cpu, "processes": n, "rss_gib": rss, "pss_gib": pss}


def row(label: str, run: str, r: dict) -> str:
    cells = f"{r['ready_s']:.1f} | {r['cpu_s']:.0f} | {r['processes']:.0f} | {r['rss_gib']:.2f} | {r['pss_gib']:.2f}"
    return f"| {label} | {run} | {cells} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    args = parser.parse_args()
    out = ROOT / "artifacts" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"load average before: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}",
        "",
        "| config | run | ready s | CPU s | processes | RSS GiB (sum) | PSS GiB (sum) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, make_config in CONFIGS.items():
        if args.config not in ("all", label):
            continue
        runs = []
        for i in range(args.runs):
            runs.append(one_run(make_config, out / f"startup-{len(lines)}"))
            lines.append(row(label, str(i + 1), runs[-1]))
            print(lines[-1], flush=True)
        lines.append(row(label, "median", {k: statistics.median(r[k] for r in runs) for k in runs[0]}))
    lines.append(f"\nload average after: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    (out / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
