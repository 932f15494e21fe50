"""Processes of a run and the ports they hold, found by proof rather than by name.

A run lives in a session of its own: the supervisor is its leader, and every process Ray starts stays
in it (Ray's workers move to process groups of their own, never to another session; HAProxy is in its
worker's group), even one re-parented to init after its parent died, such as an orphaned HAProxy.
Every process of the run also starts with RAYINFER_RUN_ID=<the run's random id> in its environment
(/proc/<pid>/environ), except those that rewrite that memory to change their title (Ray's dashboard
modules and agents). So a process is the run's when it carries the run's id, or when it is in the
session of one that does: a session id is the pid of its leader, and the kernel keeps that pid
reserved while any process of the session lives, so no other session can have it meanwhile. A
process's name is never the proof.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

RUN_ID_VAR = "RAYINFER_RUN_ID"


def run_members(run_id: str, session: int | None = None, exclude: Iterable[int] = ()) -> list[psutil.Process]:
    """Every live process of the run: those started with RAYINFER_RUN_ID=run_id, and every process of
    `session` when one of those is in it (zombies left out: they hold nothing)."""
    skip = {os.getpid(), *exclude}
    marked, in_session, proven = [], [], False
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            sid = os.getsid(proc.pid)
            if _run_id(proc) == run_id:
                marked.append(proc)
                proven = proven or sid == session
            elif session is not None and sid == session:
                in_session.append(proc)
    return [p for p in marked + (in_session if proven else []) if p.pid not in skip]


def _run_id(proc: psutil.Process) -> str | None:
    try:
        return proc.environ().get(RUN_ID_VAR)
    except psutil.Error:
        return None


def kill_run(
    run_id: str, session: int | None = None, exclude: Iterable[int] = (), timeout_s: float = 10.0
) -> list[psutil.Process]:
    """SIGKILL every process of the run (but `exclude` and this one); returns those still alive after `timeout_s`.
    Repeats until none is found, since a dying worker's children can appear while it goes."""
    deadline = time.monotonic() + timeout_s
    while True:
        members = run_members(run_id, session, exclude)
        for proc in members:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        _, alive = psutil.wait_procs(members, timeout=max(0.0, deadline - time.monotonic()))
        if not members or alive or time.monotonic() >= deadline:
            return [p for p in alive if p.is_running() and _status(p) != psutil.STATUS_ZOMBIE]


def _status(proc: psutil.Process) -> str:
    try:
        return proc.status()
    except psutil.Error:
        return psutil.STATUS_DEAD


@dataclass(frozen=True)
class Holder:
    """A process listening on a TCP port."""

    port: int
    pid: int | None  # None: a process this user may not inspect (another user's, without root)

    def describe(self) -> str:
        if self.pid is None:
            return f"port {self.port} is held by a process this user cannot see (`ss -ltnp 'sport = :{self.port}'`)"
        try:
            proc = psutil.Process(self.pid)
            with proc.oneshot():
                cmd = " ".join(proc.cmdline()) or proc.name()
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(proc.create_time()))
                user = proc.username()
        except psutil.Error:
            return f"port {self.port} is held by pid {self.pid} (gone since)"
        return f"port {self.port} is held by pid {self.pid} ({cmd[:160]}), user {user}, started {started}"

    def run_id(self) -> str | None:
        """The RAYINFER_RUN_ID the holder was started with, if any."""
        if self.pid is None:
            return None
        try:
            return _run_id(psutil.Process(self.pid))
        except psutil.Error:
            return None


def listeners(ports: Iterable[int]) -> list[Holder]:
    """Who listens on any of `ports` (TCP, IPv4 or IPv6, any address), one entry per port and process."""
    wanted = set(ports)
    found = {
        (c.laddr.port, c.pid)
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in wanted
    }
    return [Holder(port, pid) for port, pid in sorted(found, key=lambda x: (x[0], x[1] or 0))]


def wait_ports_free(ports: Iterable[int], timeout_s: float) -> list[Holder]:
    """Until nothing listens on `ports` (a killed process's sockets close as it is reaped); the holders left."""
    ports = list(ports)
    deadline = time.monotonic() + timeout_s
    while (held := listeners(ports)) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling the kernel's socket table
    return held
