from __future__ import annotations

import pytest

from tests.helpers import MODEL


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where CUDA is; elsewhere they are skipped, with the reason shown (-rs)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run on a GPU machine (pytest -m gpu tests/gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bundled_path():
    from models.loader import resolve_source

    return resolve_source(f"bundled:{MODEL}")


@pytest.fixture(scope="session")
def reference(bundled_path):
    """sentence-transformers' own encoder for the same checkpoint: the ground truth."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(bundled_path), device="cpu")
    return lambda texts: st.encode(list(texts), convert_to_numpy=True, batch_size=64)
