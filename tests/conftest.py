from __future__ import annotations

import pytest

from tests.helpers import MODEL


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
