"""`python -m batch` as users run it: a process that starts its own local Ray cluster.

The driver is SIGKILLed mid-run and started again with the same arguments: the second run resumes
from what the first committed and the output ends with exactly one row per input id."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest
from ray._common.test_utils import wait_for_condition

from batch import output
from tests.batch.data import read_errors, read_output, write_jsonl
from tests.harness import ClusterSnapshot
from tests.helpers import MODEL, SERVE_CONFIG

ROOT = SERVE_CONFIG.parent


def batch_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "batch", "embed", "--config", str(SERVE_CONFIG), *args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.pop("RAY_ADDRESS", None)  # its own new cluster, never the test session's nor anyone else's
    return e


@pytest.mark.slow
@pytest.mark.timeout(900)  # two whole runs, each starting its own cluster
def test_driver_killed_and_restarted_writes_each_row_exactly_once(tmp_path):
    n = 1500
    path = write_jsonl(tmp_path / "in.jsonl", range(n), [json.dumps({"id": "no-text"})])
    out = tmp_path / "out"
    args = batch_cli(
        "--model",
        MODEL,
        "--input",
        str(path),
        "--output",
        str(out),
        "--rows-per-file",
        "100",
        "--batch-size",
        "50",
        "--no-progress",
    )
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(
            args, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    cluster = None
    try:
        wait_for_condition(
            lambda: output.committed_rows(out) > 0 or first.poll() is not None, timeout=300, retry_interval_ms=200
        )
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        cluster = ClusterSnapshot.of(first.pid)
        assert cluster.raylets, "the driver started no cluster of its own"
        os.kill(first.pid, signal.SIGKILL)  # the driver alone, as the OOM killer or a lost node would
        first.wait()
        # The local cluster it started goes down with it: nothing of the first run writes any more. (Ray's
        # two agents outlive it by a minute, running nothing: ClusterSnapshot.leftovers_but_agents.)
        wait_for_condition(lambda: not cluster.leftovers_but_agents(), timeout=120)
        committed = output.committed_rows(out)
        assert 0 < committed < n
        second = subprocess.run(args, check=False, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
        done_before = int(re.search(r"([\d,]+) done before", second.stdout).group(1).replace(",", ""))
        assert done_before == committed
        assert sorted(read_output(out)) == sorted(str(i) for i in range(n))
    finally:  # what is left of the first run's cluster (its agents; all of it if the test failed), and only that
        for pid in cluster.leftovers() if cluster else {first.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert [(e["id"], e["reason"]) for e in read_errors(out)] == [("no-text", "missing text")]


def test_another_run_into_the_same_output_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", range(3))
    out = tmp_path / "out"
    output.claim(
        out,
        {
            "task": "embed",
            "model": f"{MODEL}-pipeline",
            "inputs": [str(path)],
            "format": "jsonl",
            "id_field": "id",
            "text_field": "text",
            "truncate": False,
        },
    )
    done = subprocess.run(
        check=False,
        args=batch_cli("--model", MODEL, "--input", str(path), "--output", str(out)),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "holds the output of another run" in done.stderr and f"{MODEL}-pipeline" in done.stderr


def test_unknown_model_and_missing_input_exit_2_naming_them(tmp_path):
    done = subprocess.run(
        check=False,
        args=batch_cli("--model", "nope", "--input", "x.jsonl", "--output", str(tmp_path / "o")),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "no model 'nope'" in done.stderr and MODEL in done.stderr
    done = subprocess.run(
        check=False,
        args=batch_cli("--model", MODEL, "--input", str(tmp_path / "none*.jsonl"), "--output", str(tmp_path / "o")),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "no input files" in done.stderr
