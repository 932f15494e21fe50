"""Shared test helpers (no fixtures here; see conftest.py files)."""

from __future__ import annotations

import numpy as np

from tests.harness import ROOT, free_port, serve_config_on  # noqa: F401  (re-exported for tests)

SERVE_CONFIG = ROOT / "serve_config.yaml"
MODEL = "all-MiniLM-L6-v2"


def cosine(a, b) -> np.ndarray:
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
