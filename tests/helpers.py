"""Shared test helpers (no fixtures here; see conftest.py files). Light on purpose: no Ray here, so
model-level tests (tests/unit, tests/gpu) import it anywhere torch runs."""

from __future__ import annotations

import contextlib
import secrets
import socket
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "serve_config.yaml"
MODEL = "all-MiniLM-L6-v2"


_GIVEN: set[int] = set()  # ports this process handed out already
RAY_WORKER_PORTS_END = 20000  # Ray's workers take ports 10002-19999 (min/max_worker_port); Ray refuses others there


def free_port() -> int:
    """A port nothing is bound to, between Ray's worker ports and the kernel's ephemeral range
    (ip_local_port_range). One the kernel picks (bind to 0) is ephemeral: any outgoing connection can
    take it before the server binds it, which once stopped a test cluster's HAProxy (Address already in use)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    while True:
        port = RAY_WORKER_PORTS_END + secrets.randbelow(max(ephemeral_low - RAY_WORKER_PORTS_END, 1000))
        if port in _GIVEN:
            continue
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("", port))  # every address: taken if anything holds the port on any of them
            _GIVEN.add(port)
            return port


def cosine(a: Any, b: Any) -> np.ndarray:
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def varied_texts() -> list[str]:
    """Short and long, Latin and not, prose and code: real text from this repository plus samples."""
    prose = (ROOT / "README.md").read_text() + (ROOT / "BENCHMARKS.md").read_text()
    code = (ROOT / "app" / "core" / "registry.py").read_text() + (ROOT / "models" / "embedding.py").read_text()
    samples = [
        "hi", "The cat sits outside", "A man is playing guitar.", "日本語のテキストです。東京は大きな都市です。",
        "Привет, как дела? Сегодня хорошая погода.", "مرحبا بالعالم، هذه جملة عربية.", "😀 emoji 🚀 and ✓ marks",
        "Ελληνικά κείμενα για δοκιμή.", "हिन्दी में एक वाक्य।", "SELECT id, name FROM users WHERE active = 1;",
    ]  # fmt: skip
    paragraphs = [p for p in prose.split("\n\n") if p.strip()][:160]
    functions = [f for f in code.split("\n\n") if f.strip()][:60]
    return samples + paragraphs + functions


def __getattr__(name: str) -> Any:
    """`serve_config_on` lives with the cluster harness (it imports Ray): loaded only when asked for."""
    if name == "serve_config_on":
        from tests.harness import serve_config_on

        return serve_config_on
    raise AttributeError(name)
