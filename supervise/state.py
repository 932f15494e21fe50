"""What a run records about itself (artifacts/run/<name>.json), and the check before a start:
an earlier run of this checkout still going, its leftovers after a crash, ports held by others."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from supervise import procs

# The exit status of a start refused because of what holds its ports: not worth restarting
# (the systemd unit lists it in RestartPreventExitStatus).
REFUSED = 3


class Refused(Exception):
    """The run cannot start; the message says what holds what and what to do."""


@dataclass
class RunRecord:
    name: str  # e.g. serve-8000: one run per name at a time
    run_id: str
    pid: int  # the supervisor, leader of the run's session (its id is this pid)
    create_time: float  # the supervisor's, so a recycled pid is never taken for it
    front_pid: int  # the process to signal to stop the run
    command: list[str]
    ports: dict[int, str]  # port -> the setting that moves it
    started: str

    def supervisor_alive(self) -> bool:
        try:
            return abs(psutil.Process(self.pid).create_time() - self.create_time) < 0.01
        except psutil.Error:
            return False


def record_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.json"


def save(state_dir: Path, record: RunRecord) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = record_path(state_dir, record.name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1))
    tmp.replace(path)
    return path


def load_all(state_dir: Path) -> list[tuple[Path, RunRecord]]:
    records = []
    for path in sorted(state_dir.glob("*.json")) if state_dir.is_dir() else []:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            raw = json.loads(path.read_text())
            raw["ports"] = {int(k): v for k, v in raw["ports"].items()}
            records.append((path, RunRecord(**raw)))
    return records


def forget(path: Path) -> None:
    path.unlink(missing_ok=True)


def preflight(state_dir: Path, name: str, ports: dict[int, str], log: Callable[[str], None]) -> None:
    """Before a start: refuse if a run of this checkout with the same name or ports is still
    going; clean up what a dead one left (its recorded run id proves the processes are its own);
    refuse, naming every holder, if any port is still in use."""
    for path, record in load_all(state_dir):
        overlap = sorted(set(record.ports) & set(ports))
        if record.supervisor_alive():
            if record.name == name or overlap:
                raise Refused(
                    f"rayinfer is already running from this checkout ({record.name}, supervisor pid {record.pid}, "
                    f"started {record.started}, ports {sorted(record.ports)}).\n"
                    f"Stop it with Ctrl-C in its terminal or `kill -TERM {record.front_pid}`, then start again."
                )
            continue
        left = procs.run_members(record.run_id, record.pid)
        if left:
            log(
                f"the run {record.name} started {record.started} ended without stopping its processes; "
                f"stopping them: " + "; ".join(f"pid {p.pid} {_cmd(p)}" for p in left)
            )
            if alive := procs.kill_run(record.run_id, record.pid):
                raise Refused(f"could not stop the leftover processes {[p.pid for p in alive]}: kill them, then retry")
        forget(path)
    held = procs.listeners(ports)
    if held:
        raise Refused(_port_message(held, ports))


def _port_message(held: list[procs.Holder], ports: dict[int, str]) -> str:
    lines = ["ports this run needs are in use, and not by a leftover of a run of this checkout:"]
    for holder in held:
        line = f"  {holder.describe()} [{ports[holder.port]}]"
        if (run_id := holder.run_id()) is not None:
            line += f"\n    it is a rayinfer process (RAYINFER_RUN_ID={run_id}) of a run not recorded here"
        lines.append(line)
    pids = sorted({h.pid for h in held if h.pid is not None})
    lines.append(
        "Nothing was stopped. Stop the holder if it is yours"
        + (f" (`kill {' '.join(map(str, pids))}`)" if pids else "")
        + ", or give this run other ports (the setting in brackets), then start again."
    )
    return "\n".join(lines)


def _cmd(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(proc.cmdline())[:120]
    return "?"


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")
