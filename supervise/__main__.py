"""`python -m supervise serve|head|node ...`: run rayinfer's Ray cluster as a service.

This process stays in the foreground (what `make serve` execs, a systemd unit's main process, a
container's PID 1). It starts the supervisor (supervise/supervisor.py) in a session of its own, in
which every process of the run lives, relays SIGINT, SIGTERM and SIGHUP to it, reaps orphans when it
is PID 1, and exits with its status. The supervisor holds a pipe from this process: if this process
is killed (SIGKILL of the whole process group, a supervisor's kill timeout), the pipe closes and the
supervisor stops the run at once.

  serve CONFIG             `serve run CONFIG` on a new local cluster            (make serve)
  head CONFIG [RAY_ARG..]  `ray start --head --block` + `serve deploy CONFIG`    (deploy/systemd)
  node [RAY START CMD..]   a container's `ray start --block` (KubeRay's command) (deploy/entrypoint)

Stop bound: --stop-timeout-s, or RAYINFER_STOP_TIMEOUT_S (default 30): the graceful drain's limit,
after which every process of the run is killed. A second signal kills them at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import subprocess
import sys

RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m supervise", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["serve", "head", "node"])
    parser.add_argument("args", nargs=argparse.REMAINDER, help="serve/head: CONFIG [ray start args]; node: command")
    parser.add_argument(
        "--stop-timeout-s",
        type=float,
        default=float(os.environ.get("RAYINFER_STOP_TIMEOUT_S", "30")),
        help="longest graceful drain before every process of the run is killed (default 30, RAYINFER_STOP_TIMEOUT_S)",
    )
    parser.add_argument(
        "--state-dir",
        default=os.environ.get("RAYINFER_STATE_DIR", "artifacts/run"),
        help="where runs record themselves, to find their leftovers after a crash (RAYINFER_STATE_DIR)",
    )
    args = parser.parse_args(argv)
    if args.mode in ("serve", "head") and not args.args:
        parser.error(f"{args.mode} needs a config file")
    if args.stop_timeout_s <= 0:
        parser.error("--stop-timeout-s must be positive")
    return args


def front(argv: list[str]) -> int:
    """The foreground process: start the supervisor in its own session and relay stop signals to it."""
    parse(argv)  # usage errors here, in the foreground
    child: subprocess.Popen | None = None
    pending: list[int] = []

    def relay(sig: int, _frame: object) -> None:
        if child is None:
            pending.append(sig)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, sig)

    for relayed in RELAYED:
        signal.signal(relayed, relay)
    read_end, _write_end = os.pipe()  # kept open for life: the supervisor sees EOF when this process dies
    env = {**os.environ, "RAYINFER_RUN_ID": secrets.token_hex(16)}
    command = [sys.executable, "-m", "supervise.session", str(read_end), *argv]
    child = subprocess.Popen(command, pass_fds=(read_end,), start_new_session=True, env=env)
    os.close(read_end)
    for sig in pending:
        relay(sig, None)
    while True:
        pid, status = os.waitpid(-1, 0)  # as PID 1 (a container) this also reaps orphans
        if pid == child.pid:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(front(sys.argv[1:]))
