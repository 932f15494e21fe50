"""The supervisor's entry point, started by `python -m supervise` as the leader of a new session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from supervise import plans
from supervise.__main__ import parse
from supervise.procs import RUN_ID_VAR
from supervise.supervisor import Supervisor


def main(argv: list[str]) -> int:
    front_fd = int(argv[0])
    os.set_inheritable(front_fd, False)  # the run's own processes must not hold the foreground's pipe open
    args = parse(argv[1:])
    run_id = os.environ[RUN_ID_VAR]
    if args.mode == "serve":
        plan = plans.serve_plan(args.args[0], run_id)
    elif args.mode == "head":
        plan = plans.head_plan(args.args[0], run_id, args.args[1:])
    else:
        plan = plans.node_plan(run_id, args.args)
    return Supervisor(plan, run_id, Path(args.state_dir), args.stop_timeout_s, front_fd).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
