"""Shared test helpers (no fixtures here; see conftest.py files). Light on purpose: no Ray here, so
model-level tests (tests/unit, tests/gpu) import it anywhere torch runs."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "serve_config.yaml"
MODEL = "all-MiniLM-L6-v2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
