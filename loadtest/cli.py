"""`python -m loadtest`: how ops learn their p99 and capacity before users do."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from loadtest import report, runner
from loadtest.scenarios import make_scenario


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--scenario", choices=["embeddings", "oip-embeddings", "completions"], default="embeddings")
    p.add_argument("--model", help="model id (default: the scenario's default model)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    mode.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds (after warm-up)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds sent but not measured")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    p.add_argument("--texts", type=int, default=1, help="embeddings: texts per request")
    p.add_argument("--max-tokens", type=int, default=32, help="completions: tokens per request")
    p.add_argument("--sweep", action="store_true", help="with --rate: raise the rate until p99 passes --slo-p99-ms")
    p.add_argument("--sweep-factor", type=float, default=1.25, help="rate multiplier per sweep step")
    p.add_argument("--slo-p99-ms", type=float, default=500.0)
    p.add_argument("--max-error-rate", type=float, default=0.01, help="sweep: a step with more errors fails")
    p.add_argument("--nice", type=int, help="renice this process (e.g. 15, to match Ray's workers on one machine)")
    p.add_argument("--json", help="write the summary (or sweep) as JSON here")
    p.add_argument("--plot", help="write latency-over-time and CDF as PNG here")
    p.add_argument("--quiet", action="store_true", help="no live progress")
    args = p.parse_args(argv)
    if args.sweep and not args.rate:
        p.error("--sweep needs --rate (the starting rate)")
    return args


def run_once(args, scenario, rate=None):
    from rich.progress import Progress, TextColumn

    rate = rate or args.rate
    with Progress(TextColumn("{task.description}"), disable=args.quiet, transient=True) as progress:
        task = progress.add_task("starting")
        done = 0

        def on_done():
            nonlocal done
            done += 1
            progress.update(task, description=f"{scenario.name}: {done} answered")

        if rate:
            coro = runner.open_loop(args.url, scenario, rate, args.duration, args.warmup, args.timeout, on_done=on_done)
        else:
            coro = runner.closed_loop(
                args.url, scenario, args.concurrency, args.duration, args.warmup, args.timeout, on_done=on_done
            )
        samples = asyncio.run(coro)
    summary = report.summarize(samples, args.duration, scenario.items(), rate, args.concurrency, scenario.name)
    return samples, summary


def passes(summary: dict, args) -> bool:
    lat = summary["latency_ms"]
    return (
        lat is not None
        and lat["p99"] <= args.slo_p99_ms
        and (summary["error_rate"] or 0) <= args.max_error_rate
        and summary["achieved_rate"] >= 0.9 * summary["target_rate"]
    )


def sweep(args, scenario, console) -> dict:
    rate, steps, best = args.rate, [], None
    while True:
        samples, summary = run_once(args, scenario, rate)
        ok = passes(summary, args)
        steps.append({**summary, "passed": ok})
        console.print(report.table(summary))
        console.print(
            f"rate {rate:.1f}/s: p99 {summary['latency_ms'] and summary['latency_ms']['p99']} ms → "
            f"{'held' if ok else 'FAILED'} the {args.slo_p99_ms} ms SLO"
        )
        if not ok:
            break
        best, last_samples = rate, samples
        rate *= args.sweep_factor
    if args.plot and best is not None:
        report.plot(last_samples, args.plot, f"{scenario.name} at {best:.1f}/s (highest rate holding the SLO)")
    return {"slo_p99_ms": args.slo_p99_ms, "max_rate_holding_slo": best, "steps": steps}


def main(argv=None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    console = Console(stderr=True)
    scenario = make_scenario(args.scenario, args.model, args.texts, args.max_tokens)
    if args.sweep:
        result = sweep(args, scenario, console)
        console.print(f"capacity: {result['max_rate_holding_slo']} req/s at p99 ≤ {args.slo_p99_ms} ms")
        failed = result["max_rate_holding_slo"] is None
    else:
        samples, result = run_once(args, scenario)
        console.print(report.table(result))
        if args.plot:
            report.plot(samples, args.plot, f"{scenario.name} · {result['mode']}")
        failed = result["ok"] == 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    else:
        json.dump(result, sys.stdout, indent=2)
        print()
    return 1 if failed else 0
