"""`python -m loadtest` against the session's Serve instance, in both modes."""

from __future__ import annotations

import json

from loadtest.cli import main


def test_open_loop_writes_json_and_plot(serve_url, tmp_path):
    out, png = tmp_path / "open.json", tmp_path / "open.png"
    rc = main(
        [
            "--url",
            serve_url,
            "--rate",
            "15",
            "--duration",
            "3",
            "--warmup",
            "1",
            "--quiet",
            "--json",
            str(out),
            "--plot",
            str(png),
        ]
    )
    result = json.loads(out.read_text())
    assert rc == 0
    assert result["mode"] == "open-loop" and result["errors_by_status"] == {}
    assert 0.5 * 15 <= result["achieved_rate"] <= 2 * 15
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_closed_loop_counts_items(serve_url, tmp_path):
    out = tmp_path / "closed.json"
    rc = main(
        [
            "--url",
            serve_url,
            "--concurrency",
            "4",
            "--texts",
            "8",
            "--duration",
            "3",
            "--warmup",
            "1",
            "--quiet",
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert rc == 0 and result["mode"] == "closed-loop" and result["ok"] > 0
    assert result["items_per_s"] == round(result["ok"] * 8 / 3, 2)


def test_completions_scenario_measures_tokens_and_first_token(serve_url, tmp_path):
    out = tmp_path / "completions.json"
    rc = main(
        [
            "--url",
            serve_url,
            "--scenario",
            "completions",
            "--concurrency",
            "2",
            "--max-tokens",
            "8",
            "--duration",
            "10",  # long enough for a request of a real model to finish on a loaded 2-core machine
            "--warmup",
            "1",
            "--quiet",
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert rc == 0 and result["scenario"] == "completions" and result["errors_by_status"] == {}
    assert result["ok"] > 0 and 0 < result["tokens_per_s"] <= round(result["ok"] * 8 / 10, 2)  # rounded as reported
    assert 0 < result["ttft_ms"]["p50"] <= result["latency_ms"]["p50"]
