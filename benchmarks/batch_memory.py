"""Memory of `python -m batch embed` over a long input: is it flat? A report script, not a test.

    python -m benchmarks.batch_memory [--rows 1000000] [--every 5]     # report: artifacts/bench/batch-memory.md

Runs the job (its own local cluster, in its own process group) over `--rows` short rows and, every
`--every` seconds, reads each process of the group from /proc: the driver, the model actor, the
other Ray workers (read, tokenize, write tasks), Ray's own daemons; RSS per role and PSS of them all
(PSS shares the object store's pages out instead of counting them in every process). Beside each
sample: the rows committed so far. Flat means the same megabytes at 20 % of the rows as at 90 %.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from batch import output
from benchmarks import NICE, own_cluster_env
from tests.harness import ROOT, launch, process_tree

ROLES = ("driver", "model actor", "other Ray workers", "Ray daemons")


def make_input(path: Path, rows: int) -> Path:
    if path.exists() and sum(1 for _ in path.open()) == rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"id": i, "text": f"row {i}"}) + "\n")
    return path


def _kib(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def _role(pid: int, driver: int) -> str:
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    if pid == driver:
        return "driver"
    if "WholeModel" in cmd or "EncoderStagePool" in cmd:
        return "model actor"
    return "other Ray workers" if cmd.startswith("ray::") and "Agent" not in cmd else "Ray daemons"


def sample(driver: int) -> dict:
    """MiB per role (RSS) and PSS of the whole group."""
    rss = dict.fromkeys(ROLES, 0)
    pss = 0
    for pid in process_tree(driver):
        with contextlib.suppress(OSError):
            rss[_role(pid, driver)] += _kib(Path(f"/proc/{pid}/status"), "VmRSS:")
            pss += _kib(Path(f"/proc/{pid}/smaps_rollup"), "Pss:")
    return {**{k: v / 1024 for k, v in rss.items()}, "PSS, all": pss / 1024}


def run(rows_path: Path, out: Path, every: float, model: str, samples_csv: Path) -> list[dict]:
    """Run the job, sampling its memory every `every` s; each sample is appended to `samples_csv` as it
    is taken, so a run stopped early (an hour-long 1 M-row run) still leaves what it measured."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [
        "nice",
        "-n",
        str(NICE),
        sys.executable,
        "-m",
        "batch",
        "embed",
        "--model",
        model,
        "--input",
        str(rows_path),
        "--output",
        str(out),
        "--no-progress",
    ]
    env = own_cluster_env()
    proc = launch(cmd, env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    samples: list[dict] = []
    start = time.monotonic()
    with samples_csv.open("w", newline="") as fh:
        writer = None
        while proc.poll() is None:
            samples.append({"s": time.monotonic() - start, "rows": output.committed_rows(out), **sample(proc.pid)})
            if writer is None:
                writer = csv.DictWriter(fh, fieldnames=list(samples[0]))
                writer.writeheader()
            writer.writerow(samples[-1])
            fh.flush()
            time.sleep(every)  # a sampling period, not synchronisation
    if proc.returncode != 0:
        raise RuntimeError(f"batch failed ({proc.returncode})")
    print(proc.stdout.read())
    return samples


def report(samples: list[dict], rows: int, model: str) -> str:
    def at(share: float) -> dict:  # the sample at that share of the run's time
        end = samples[-1]["s"]
        return next(s for s in samples if s["s"] >= share * end)

    cols = (*ROLES, "PSS, all")
    lines = [
        f"## Memory over {rows:,} short rows ({model})",
        "",
        f"`python -m benchmarks.batch_memory --rows {rows}`: MiB, sampled while the job ran ({len(samples)} samples).",
        "",
        "| rows committed | " + " | ".join(cols) + " |",
        "|---:|" + "---:|" * len(cols),
    ]
    for share in (0.1, 0.2, 0.5, 0.9):
        s = at(share)
        lines.append(f"| {s['rows']:,} | " + " | ".join(f"{s[c]:.0f}" for c in cols) + " |")
    peak = {c: max(s[c] for s in samples) for c in cols}
    lines.append("| max over the run | " + " | ".join(f"{peak[c]:.0f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.batch_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--every", type=float, default=5.0)
    ap.add_argument("--model", default="all-MiniLM-L6-v2")
    ap.add_argument("--dir", type=Path, default=ROOT / "artifacts" / "bench" / "batch")
    args = ap.parse_args(argv)
    rows_path = make_input(args.dir / f"short-{args.rows}.jsonl", args.rows)
    samples = run(rows_path, args.dir / "memory-out", args.every, args.model, args.dir / "memory-samples.csv")
    text = report(samples, args.rows, args.model)
    (args.dir.parent / "batch-memory.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
