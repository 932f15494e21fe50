"""The supervisor: the leader of the session every process of the run lives in.

It checks what an earlier run left (supervise/state.py), starts the plan's command, waits until the
run is ready, and stops it: the first stop request drains gracefully (the plan's way) for at most
`stop_timeout_s`; a second request, the deadline, or the death of the foreground process (its pipe
closes) kills every process of the run at once. Either way it then checks that the run's ports are
free, and removes the run's record.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil

from supervise import log, procs, state
from supervise.plans import Plan

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PORTS_FREE_TIMEOUT_S = 10.0


class Supervisor:
    def __init__(self, plan: Plan, run_id: str, state_dir: Path, stop_timeout_s: float, front_fd: int | None):
        self.plan, self.run_id, self.state_dir = plan, run_id, state_dir
        self.stop_timeout_s = stop_timeout_s
        self.front_fd = front_fd
        self.requests: list[int] = []  # stop signals received, in order
        self.asked_at: float | None = None  # when the first stop request came (time.monotonic)
        self.failed: str | None = None  # why the start failed (a step of the plan raised)
        self.ready = threading.Event()
        self.stopping = threading.Event()

    def _on_signal(self, sig: int, _frame: object) -> None:
        self.asked_at = self.asked_at or time.monotonic()
        self.requests.append(sig)

    def run(self) -> int:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        try:
            state.preflight(self.state_dir, self.plan.name, self.plan.ports, log)
        except state.Refused as refused:
            log(f"not started: {refused}")
            return state.REFUSED
        record = state.RunRecord(
            self.plan.name,
            self.run_id,
            os.getpid(),
            psutil.Process().create_time(),
            os.getppid(),
            self.plan.command,
            self.plan.ports,
            state.now(),
        )
        if self.requests:  # asked to stop before anything started
            return 0
        path = state.save(self.state_dir, record)
        log(f"starting {' '.join(self.plan.command)} (run {self.plan.name}, record {path})")
        child = subprocess.Popen(self.plan.command, env=self.plan.env, stdin=subprocess.DEVNULL)
        code = 1
        try:
            code = self._watch(child)
        finally:
            code = self._clean_up(child, code)
            state.forget(path)
        return code

    def _watch(self, child: subprocess.Popen) -> int:
        threading.Thread(target=self._start_up, args=(child,), daemon=True).start()
        deadline = None
        while True:
            if self.front_fd is not None and select.select([self.front_fd], [], [], 0.2)[0]:
                if not os.read(self.front_fd, 1):  # EOF: the foreground process is gone
                    self.asked_at = self.asked_at or time.monotonic()
                    log("the foreground process is gone: stopping at once")
                    return 0
            elif self.front_fd is None:
                time.sleep(0.2)  # polling the child and the signal flags
            if self.failed is not None:
                log(f"could not start: {self.failed}")
                return 1
            if len(self.requests) >= 2:
                log(f"second stop request ({signal.Signals(self.requests[1]).name}): stopping at once")
                return 0
            if self.requests and deadline is None:
                deadline = time.monotonic() + self.stop_timeout_s
                self.stopping.set()
                name = signal.Signals(self.requests[0]).name
                log(f"{name}: draining for at most {self.stop_timeout_s:g} s (a second signal stops at once)")
                threading.Thread(target=self.plan.graceful, args=(child, deadline), daemon=True).start()
            if child.poll() is not None:
                if deadline is not None:
                    return 0
                log(f"{self.plan.command[0]} exited with {child.returncode} without being asked to stop")
                return 1
            if deadline is not None and time.monotonic() > deadline:
                log(f"still draining after {self.stop_timeout_s:g} s: stopping at once")
                return 0

    def _start_up(self, child: subprocess.Popen) -> None:
        started = time.monotonic()
        try:
            if self.plan.prepare is not None:
                self.plan.prepare(self.stopping.is_set)
        except Exception as error:
            self.failed = str(error) or type(error).__name__
            return
        while self.plan.ready_url and not self.stopping.is_set() and child.poll() is None:
            try:
                if httpx.get(self.plan.ready_url, timeout=2).status_code == 200:
                    self.ready.set()
                    log(f"ready after {time.monotonic() - started:.0f} s: {self.plan.ready_url}")
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)  # polling the run's readiness endpoint

    def _clean_up(self, child: subprocess.Popen, code: int) -> int:
        """Kill whatever of the run is left, then check that its ports are free."""
        started = time.monotonic()
        self.stopping.set()
        alive = procs.kill_run(self.run_id, os.getsid(0))
        if child.poll() is None:
            child.kill()
        child.wait()
        if alive:
            log("could not stop: " + ", ".join(f"pid {p.pid}" for p in alive))
            code = code or 1
        held = procs.wait_ports_free(self.plan.ports, PORTS_FREE_TIMEOUT_S)
        for holder in held:
            log(f"after the stop, {holder.describe()}")
            code = code or 1
        if self.asked_at is not None and not alive and not held:
            total = time.monotonic() - self.asked_at
            log(f"stopped {total:.1f} s after the stop request ({time.monotonic() - started:.1f} s to clean up)")
        return code
