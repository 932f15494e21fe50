"""The load-test tool's arithmetic, on synthetic samples."""

from __future__ import annotations

import pytest

from loadtest.cli import parse_args, passes
from loadtest.report import summarize
from loadtest.runner import Sample
from loadtest.scenarios import Outcome


def samples(latencies_ms, status="200", warmup=False, t0=0.0):
    return [
        Sample(t=t0 + i * 0.01, latency_s=ms / 1000, outcome=Outcome(status=status), warmup=warmup)
        for i, ms in enumerate(latencies_ms)
    ]


def test_percentiles_errors_and_rates_from_measured_samples_only():
    measured = samples(range(1, 101)) + samples([5] * 10, status="503")
    warm = samples([10_000] * 50, warmup=True)
    s = summarize(
        measured + warm, duration_s=10, items_per_request=4, target_rate=12, concurrency=None, scenario="embeddings"
    )
    assert s["requests"] == 110 and s["ok"] == 100
    assert s["errors_by_status"] == {"503": 10}
    assert s["latency_ms"]["p50"] == pytest.approx(50.5)
    assert s["latency_ms"]["p99"] == pytest.approx(99.01)
    assert s["latency_ms"]["max"] == 100  # the warm-up's 10 s samples are not counted
    assert (s["throughput_rps"], s["items_per_s"], s["achieved_rate"]) == (10.0, 40.0, 11.0)
    assert s["mode"] == "open-loop"


def test_sweep_step_fails_on_p99_errors_or_missed_rate():
    args = parse_args(["--rate", "10", "--sweep", "--slo-p99-ms", "150"])
    good = summarize(samples([100] * 100), 10, 1, 10, None, "embeddings")
    assert passes(good, args)
    slow = summarize(samples([200] * 100), 10, 1, 10, None, "embeddings")
    assert not passes(slow, args)
    errors = summarize(samples([100] * 90) + samples([1] * 10, status="503"), 10, 1, 10, None, "embeddings")
    assert not passes(errors, args)
    behind = summarize(samples([100] * 50), 10, 1, 10, None, "embeddings")  # sent 5/s of 10/s
    assert not passes(behind, args)


def test_sweep_needs_a_starting_rate():
    with pytest.raises(SystemExit):
        parse_args(["--concurrency", "4", "--sweep"])
