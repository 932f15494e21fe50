"""Driving `make serve` from the end-to-end tests: start it as a terminal would (its own process
group), record every process of the run once it is ready, and check that a stop left nothing."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import yaml
from ray._common.test_utils import wait_for_condition

from supervise import procs
from tests.harness import ROOT


@dataclass
class Run:
    make: subprocess.Popen
    log: Path
    ports: list[int]
    front: psutil.Process | None = None
    supervisor: psutil.Process | None = None
    serve: psutil.Process | None = None
    run_id: str = ""
    tree: list[psutil.Process] = field(default_factory=list)  # everything of the run, recorded when ready
    before: str = ""  # the logs of failed attempts at this start (RAYLET_TIMEOUT)

    def text(self) -> str:
        return self.before + self.log.read_text()


# Ray waits a fixed 30 s for a new raylet to register (ray/_private/node.py); on an overloaded
# machine that can run out, and `serve run` exits before anything is served (seen twice in a row
# at load average 20). Such a start is tried again, up to 3 times: it says nothing about stopping.
RAYLET_TIMEOUT = "The current node timed out during startup"


def start(setting: dict, name: str, config: str | None = None, ready_s: float = 300) -> Run:
    """`make serve CONFIG=...` (the setting's small config unless `config`) as a terminal's foreground job
    (its own process group), until its supervisor says it is ready (within `ready_s`) and /readyz is 200."""
    before = ""
    for attempt in range(3):
        try:
            run = _start(setting, f"{name}-{attempt}" if attempt else name, config or setting["config"], ready_s)
            run.before = before
            return run
        except StartFailed as failed:
            if RAYLET_TIMEOUT not in str(failed) or attempt == 2:
                raise
            before += failed.log
    raise AssertionError("unreachable")


class StartFailed(AssertionError):
    def __init__(self, message: str, log: str):
        super().__init__(message)
        self.log = log


def _start(setting: dict, name: str, config: str, ready_s: float) -> Run:
    log = setting["tmp"] / f"{name}.log"
    with log.open("w") as out:
        make = subprocess.Popen(
            ["make", "--no-print-directory", "serve", f"CONFIG={config}"],
            cwd=ROOT,
            env=setting["env"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    setting["started"].append(make)
    # Ready when the run's own supervisor says so: until its start has stopped an earlier run's
    # leftovers, /readyz may still be answered by them.
    deadline = time.monotonic() + ready_s
    while "rayinfer: ready after" not in log.read_text():
        if make.poll() is not None:
            raise StartFailed(f"make serve exited ({make.returncode}):\n{log.read_text()[-4000:]}", log.read_text())
        assert time.monotonic() < deadline, f"not ready in {ready_s:g} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)  # polling the run's log
    assert answers_200(f"http://127.0.0.1:{setting['port']}/readyz")
    run = Run(make, log, [])
    [run.front] = psutil.Process(make.pid).children()
    [run.supervisor] = run.front.children()
    run.serve = next(p for p in run.supervisor.children() if "serve" in _cmdline(p))
    run.run_id = run.supervisor.environ()[procs.RUN_ID_VAR]
    run.tree = [psutil.Process(make.pid), run.front, run.supervisor, *procs.run_members(run.run_id, run.supervisor.pid)]
    record = yaml.safe_load(next(Path(setting["env"]["RAYINFER_STATE_DIR"]).glob("*.json")).read_text())
    run.ports = [int(p) for p in record["ports"]]
    assert len(run.ports) == 6  # HTTP, gRPC, HAProxy's stats and metrics, the fallback proxy's two
    assert any("haproxy" in _cmdline(p) for p in run.tree), "HAProxy is part of the run"
    return run


def _cmdline(p: psutil.Process) -> str:
    """A process's command line; "" for one that exited since the tree was listed (an old HAProxy
    that a reload retired, a one-off Ray worker)."""
    with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
        return " ".join(p.cmdline())
    return ""


def answers_200(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url, timeout=2).status_code == 200
    return False


def wait_stopped(run: Run, bound_s: float, since: float) -> float:
    """Until make exits (if it still can) and every process of the run is gone; asserts it took at most
    `bound_s` from `since`, and that the ports are free. Returns the seconds it took."""
    wait_for_condition(lambda: not still_alive(run.tree), timeout=bound_s + 30, retry_interval_ms=200)
    took = time.monotonic() - since
    with contextlib.suppress(subprocess.TimeoutExpired):
        run.make.wait(timeout=5)
    assert took <= bound_s, f"stopped after {took:.1f} s, bound {bound_s} s:\n{run.text()[-3000:]}"
    assert not procs.run_members(run.run_id, run.supervisor.pid), "a process of the run is still running"
    assert not procs.listeners(run.ports), [h.describe() for h in procs.listeners(run.ports)]
    return took


def still_alive(tree: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


class Stream(threading.Thread):
    """A streamed completion long enough to be in flight when the run is asked to stop, short enough to
    finish within the drain (`ignore_eos`: it runs to max_tokens)."""

    def __init__(self, port: int, model: str, max_tokens: int):
        super().__init__(daemon=True)
        self.port, self.model, self.max_tokens, self.lines, self.outcome = port, model, max_tokens, [], None
        self.first = threading.Event()

    def run(self) -> None:
        body = {
            "model": self.model,
            "prompt": "Serving",
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }
        try:
            url = f"http://127.0.0.1:{self.port}/v1/completions"
            with httpx.stream("POST", url, json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line:
                        self.lines.append((time.monotonic(), line))
                        self.first.set()
            self.outcome = response.status_code
        except httpx.HTTPError as error:
            self.outcome = repr(error)
        self.first.set()
