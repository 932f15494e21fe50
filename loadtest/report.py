"""Summaries from every sample: percentiles, errors by status, achieved vs target rate; table, JSON, PNG."""

from __future__ import annotations

from collections import Counter

import numpy as np

from loadtest.runner import Sample

QUANTILES = {"p50": 50, "p90": 90, "p95": 95, "p99": 99, "p99.9": 99.9}


def _dist_ms(values) -> dict | None:
    if len(values) == 0:
        return None
    v = np.asarray(values) * 1000.0
    out = {k: round(float(np.percentile(v, q)), 2) for k, q in QUANTILES.items()}
    out.update(mean=round(float(v.mean()), 2), max=round(float(v.max()), 2), n=len(v))
    return out


def summarize(
    samples: list[Sample],
    duration_s: float,
    items_per_request: int,
    target_rate: float | None,
    concurrency: int | None,
    scenario: str,
) -> dict:
    measured = [s for s in samples if not s.warmup]
    ok = [s for s in measured if s.outcome.status == "200"]
    statuses = Counter(s.outcome.status for s in measured)
    return {
        "scenario": scenario,
        "mode": "open-loop" if target_rate else "closed-loop",
        "target_rate": target_rate,
        "concurrency": concurrency,
        "duration_s": duration_s,
        "requests": len(measured),
        "ok": len(ok),
        "errors_by_status": {k: v for k, v in sorted(statuses.items()) if k != "200"},
        "error_rate": round(1 - len(ok) / len(measured), 4) if measured else None,
        "achieved_rate": round(len(measured) / duration_s, 2),
        "throughput_rps": round(len(ok) / duration_s, 2),
        "items_per_s": round(len(ok) * items_per_request / duration_s, 2),
        "latency_ms": _dist_ms([s.latency_s for s in ok]),
        "ttft_ms": _dist_ms([s.outcome.ttft_s for s in ok if s.outcome.ttft_s is not None]),
        "itl_ms": _dist_ms([x for s in ok for x in s.outcome.itl_s]),
        "tpot_ms": _dist_ms([s.outcome.tpot_s for s in ok if s.outcome.tpot_s is not None]),
        "tokens_per_s": round(sum(s.outcome.tokens for s in ok) / duration_s, 2),
    }


def table(summary: dict):
    from rich.table import Table

    t = Table(title=f"{summary['scenario']} · {summary['mode']}", show_header=True)
    for col in ("metric", *QUANTILES, "max", "n"):
        t.add_column(col, justify="right")
    for key in ("latency_ms", "ttft_ms", "itl_ms"):
        d = summary.get(key)
        if d:
            t.add_row(key, *(f"{d[k]:.1f}" for k in QUANTILES), f"{d['max']:.1f}", str(d["n"]))
    t.caption = (
        f"requests {summary['requests']} · ok {summary['ok']} · errors {summary['errors_by_status'] or 'none'} · "
        f"{summary['throughput_rps']} req/s · {summary['items_per_s']} items/s · achieved rate "
        f"{summary['achieved_rate']}/s" + (f" of {summary['target_rate']}/s" if summary["target_rate"] else "")
    )
    return t


def plot(samples: list[Sample], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted((s for s in samples if s.outcome.status == "200"), key=lambda s: s.t)
    bad = [s for s in samples if s.outcome.status != "200"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.scatter([s.t for s in ok], [s.latency_s * 1000 for s in ok], s=3, alpha=0.5, label="ok")
    if bad:
        ax1.scatter([s.t for s in bad], [s.latency_s * 1000 for s in bad], s=6, c="red", label="error")
    ax1.set(xlabel="time since start (s)", ylabel="latency (ms)", yscale="log", title="latency over time")
    ax1.legend()
    lat = np.sort([s.latency_s * 1000 for s in ok])
    if len(lat):
        ax2.plot(lat, np.arange(1, len(lat) + 1) / len(lat))
        for q in (0.5, 0.99):
            ax2.axhline(q, ls=":", c="grey")
    ax2.set(xlabel="latency (ms)", ylabel="fraction of requests", xscale="log", title="CDF")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
