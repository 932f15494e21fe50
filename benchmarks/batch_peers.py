"""What benchmarks/bench_batch.py measures `python -m batch` against: the raw in-process limit, a Celery fan-out over
Redis, and the online service's vectors. Each timed run is a process of its own at the bench's nice.

    python -m benchmarks.batch_peers raw --model M --input rows.jsonl --batch-size 256      # prints {"rows", "seconds"}
    <celery venv>/bin/python -m benchmarks.batch_peers celery-driver --input ... --out ...   # the chord, timed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from batch.spec import Overrides, find_model, model_spec
from tests.harness import ROOT, free_port, kill_run, launch, online_vectors

SERVE_CONFIG = ROOT / "serve_config.yaml"
CELERY_VENV = ROOT / "artifacts" / "peers" / "celery-venv"
CELERY = "celery[redis]==5.7.0"


def _pool(model: str):
    cfg, options = find_model(SERVE_CONFIG, model, "embed")
    return cfg, model_spec(cfg, options, Overrides()).pools[0]


def _timed(cmd: list[str], env: dict[str, str], name: str) -> dict:
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"name": name, **result, "load": (load, os.getloadavg()[0])}


def raw_run(model: str, rows: Path, batch_size: int, nice: int) -> dict:
    """The limit: the model's loop in one process, with the actor's threads and environment."""
    cfg, pool = _pool(model)
    cmd = [
        "nice",
        "-n",
        str(nice),
        sys.executable,
        "-m",
        "benchmarks.batch_peers",
        "raw",
        "--model",
        model,
        "--input",
        str(rows),
        "--batch-size",
        str(batch_size),
    ]
    return _timed(
        cmd,
        pool.env,
        f"raw: EmbeddingModel ({cfg.runtime}), {pool.calls} slices at once x {pool.threads_per_call} threads",
    )


def _raw(model: str, input_path: Path, batch_size: int) -> dict:
    from batch.embed import embed_job, load_model
    from models.loader import resolve_source

    cfg, pool = _pool(model)
    m = load_model(embed_job(cfg, str(resolve_source(cfg.source))), pool)  # as the batch job's actor does
    texts = [json.loads(line)["text"] for line in input_path.open()]

    def one(s: int) -> int:
        ids = [t for t in m.tokenize(texts[s : s + batch_size]) if len(t) <= m.max_tokens]
        return len(m.embed_ids(ids, cfg.max_batch_size))

    start = time.perf_counter()
    # pool.calls slices at once, each on its share of the threads, as the actor (and the replica) runs them
    with ThreadPoolExecutor(pool.calls) as threads:
        done = sum(threads.map(one, range(0, len(texts), batch_size)))
    return {"rows": done, "seconds": time.perf_counter() - start}


def ensure_celery_venv() -> Path:
    """Celery in a venv of its own (never the project's), seeing this repository and the project's venv."""
    python = CELERY_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(CELERY_VENV)], check=True)
    if subprocess.run([str(python), "-c", "import celery, redis"], capture_output=True, check=False).returncode:
        subprocess.run([str(python), "-m", "pip", "install", "-q", CELERY], check=True)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # After its own packages: the repository and the project's venv (torch, transformers, the model).
    (Path(purelib) / "rayinfer-peer.pth").write_text(f"{ROOT}\n{sysconfig.get_paths()['purelib']}\n")
    return python


def _wait_port(port: int, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)  # polling a port that is not open yet
    raise RuntimeError(f"{proc.args[0]} did not listen on {port}")


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


SHAPES = {  # benchmarks/celery_peer.py says what each is
    "slices": "chord of {n}-row tasks",
    "records": "a task per record ({n} to a message, as Celery's chunks sends them)",
}


def celery_run(model: str, rows: Path, out: Path, batch_size: int, procs: int, nice: int, shape: str) -> dict:
    """redis-server + a prefork `celery worker` (`procs` processes sharing the model's threads) + the chord."""
    python = ensure_celery_venv()
    cfg, pool = _pool(model)
    port = free_port()
    env = {
        **pool.env,
        "PEER_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "PEER_MODEL": model,
        "PEER_THREADS": str(max(1, pool.threads // procs)),
    }
    nice_cmd = ["nice", "-n", str(nice)]
    redis = launch(
        [*nice_cmd, "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    worker = None
    try:
        _wait_port(port, redis)
        worker = launch(
            [
                *nice_cmd,
                str(python),
                "-m",
                "celery",
                "-A",
                "benchmarks.celery_peer",
                "worker",
                "-c",
                str(procs),
                "--pool",
                "prefork",
                "--loglevel",
                "WARNING",
                "-n",
                f"peer{port}@%h",
            ],
            {**os.environ, **env},
            cwd=ROOT,
        )
        out.mkdir(parents=True, exist_ok=True)
        cmd = [
            *nice_cmd,
            str(python),
            "-m",
            "benchmarks.batch_peers",
            "celery-driver",
            "--input",
            str(rows),
            "--out",
            str(out),
            "--batch-size",
            str(batch_size),
            "--chunk-size",
            str(cfg.max_batch_size),
            "--procs",
            str(procs),
            "--shape",
            shape,
        ]
        what = SHAPES[shape].format(n=batch_size)
        return _timed(cmd, env, f"Celery: {what}, {procs} worker processes x {env['PEER_THREADS']} threads, Redis")
    finally:
        for proc in (worker, redis):
            if proc is not None:
                _stop(proc)
                kill_run(proc)


def _celery_driver(input_path: Path, out: Path, batch_size: int, chunk_size: int, procs: int, shape: str) -> dict:
    from celery import chord, group

    from benchmarks.celery_peer import app, embed_record, embed_rows, total, write_records

    deadline = time.monotonic() + 300
    while not app.control.ping(timeout=1.0):
        if time.monotonic() > deadline:
            raise RuntimeError("no celery worker answered")
    # Every worker process loads its model before the clock starts.
    group(embed_rows.s(["warm"], ["warm up"], str(out), 999_999 - i, chunk_size) for i in range(4 * procs))().get()
    for f in out.glob("part-*.parquet"):
        f.unlink()
    records = [json.loads(line) for line in input_path.open()]
    ids, texts = [str(r["id"]) for r in records], [r["text"] for r in records]
    start = time.perf_counter()
    if shape == "records":
        pairs = list(zip(ids, texts))
        messages = group(
            embed_record.starmap(pairs[s : s + batch_size]) | write_records.s(str(out), k)
            for k, s in enumerate(range(0, len(pairs), batch_size))
        )
        written = sum(messages.apply_async().get(timeout=24 * 3600))
        return {"rows": written, "seconds": time.perf_counter() - start}
    slices = range(0, len(ids), batch_size)
    header = [
        embed_rows.s(ids[s : s + batch_size], texts[s : s + batch_size], str(out), k, chunk_size)
        for k, s in enumerate(slices)
    ]
    written = chord(header)(total.s()).get(timeout=24 * 3600)
    return {"rows": written, "seconds": time.perf_counter() - start}


def online_cosines(model: str, rows: Path, batch_out: Path, every: int) -> dict:
    """Every `every`-th row's /v1/embeddings vector (a `serve run` of the shipped config's model) against
    the batch output's."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(batch_out)
    got = dict(zip(table["id"].to_pylist(), table["embedding"].to_numpy(zero_copy_only=False)))
    records = [json.loads(line) for i, line in enumerate(rows.open()) if i % every == 0]
    online = online_vectors(model, [r["text"] for r in records])
    cos, diff, missing = [], 0.0, 0
    for r, vector in zip(records, online):
        mine = got.get(str(r["id"]))
        if mine is None:
            missing += 1
            continue
        a, b = np.asarray(vector, np.float64), np.asarray(mine, np.float64)
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        diff = max(diff, float(np.abs(a - b).max()))
    return {"rows": len(records), "min": min(cos), "max_abs": diff, "missing": missing}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.batch_peers")
    sub = ap.add_subparsers(dest="what", required=True)
    raw = sub.add_parser("raw")
    raw.add_argument("--model", required=True)
    raw.add_argument("--input", type=Path, required=True)
    raw.add_argument("--batch-size", type=int, required=True)
    drv = sub.add_parser("celery-driver")
    drv.add_argument("--input", type=Path, required=True)
    drv.add_argument("--out", type=Path, required=True)
    drv.add_argument("--batch-size", type=int, required=True)
    drv.add_argument("--chunk-size", type=int, required=True)
    drv.add_argument("--procs", type=int, required=True)
    drv.add_argument("--shape", choices=sorted(SHAPES), default="slices")
    args = ap.parse_args(argv)
    if args.what == "raw":
        result = _raw(args.model, args.input, args.batch_size)
    else:
        result = _celery_driver(args.input, args.out, args.batch_size, args.chunk_size, args.procs, args.shape)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
