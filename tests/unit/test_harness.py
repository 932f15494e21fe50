"""The harness's `launch`: a test's server in a session of its own, a benchmark's in the benchmark's
session (one scheduling group with its load generator), and `kill_run` finds everything either left,
including a descendant that left the process group and the session (as Ray's workers and HAProxy leave
the group)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.harness import SAME_SESSION, kill_run, launch

# A shell that starts a Python sleeper which moves to a session of its own (as a daemon would) and
# prints its pid, then waits in the foreground.
SLEEPER = "import os, time; os.setsid(); print(os.getpid(), flush=True); time.sleep(300)"
DESERTER = f"{sys.executable} -c '{SLEEPER}' & exec sleep 300"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("same_session", [False, True])
def test_launch_session_and_kill_run(monkeypatch: pytest.MonkeyPatch, same_session: bool) -> None:
    if same_session:
        monkeypatch.setenv(SAME_SESSION, "1")
    else:
        monkeypatch.delenv(SAME_SESSION, raising=False)
    proc = launch(["sh", "-c", DESERTER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        deserter = int(proc.stdout.readline())
        assert os.getpgid(proc.pid) == proc.pid  # a process group of its own either way
        expected_sid = os.getsid(0) if same_session else proc.pid
        assert os.getsid(proc.pid) == expected_sid
        assert os.getsid(deserter) == deserter  # left the group and the session
        kill_run(proc)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(deserter) and time.monotonic() < deadline:
            time.sleep(0.05)  # SIGKILL is delivered asynchronously; a reaper (init) collects it
        assert not _alive(deserter)
    finally:
        if proc.poll() is None:
            proc.kill()
