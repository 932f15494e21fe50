"""Shared test helpers (no fixtures here; see conftest.py files)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "serve_config.yaml"
MODEL = "all-MiniLM-L6-v2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_serve_config(http_port: int) -> dict:
    """The real serve_config.yaml with only the HTTP port changed."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"]["port"] = http_port
    return config


def cosine(a, b) -> np.ndarray:
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
