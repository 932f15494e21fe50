"""Model code without Ray: our pooled vectors are sentence-transformers' own."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.embedding import EmbeddingModel, read_pooling_spec

TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog. " * 8,
    "a",
    "Embeddings are computed with mean pooling and L2 normalisation.",
    "naïve café — ünïcödé ✓ 日本語",
]


@pytest.fixture(scope="module")
def model(bundled_path):
    return EmbeddingModel(bundled_path)


def test_spec_read_from_checkpoint(model):
    assert (model.spec.mode, model.spec.normalize, model.spec.max_seq_length) == ("mean", True, 256)
    assert (model.dim, model.max_tokens) == (384, 256)


def test_equals_sentence_transformers_encode(model, reference):
    ours = model.embed_ids(model.tokenize(TEXTS))
    np.testing.assert_allclose(ours, reference(TEXTS), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_result_independent_of_batch_mates(model):
    ids = model.tokenize(TEXTS)
    together = model.embed_ids(ids, chunk_size=2)
    alone = np.vstack([model.embed_ids([i]) for i in ids])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_truncation_matches_sentence_transformers(model, reference):
    long_text = "serving models online is mostly queueing theory " * 60
    ids = model.tokenize([long_text])[0]
    assert len(ids) > model.max_tokens
    cut = model.truncate(ids)
    assert len(cut) == model.max_tokens and cut[-1] == ids[-1]  # keeps [SEP]
    np.testing.assert_allclose(model.embed_ids([cut])[0], reference([long_text])[0], atol=1e-5)


def test_bare_checkpoint_defaults_to_mean_and_normalize(tmp_path):
    spec = read_pooling_spec(tmp_path)
    assert (spec.mode, spec.normalize, spec.max_seq_length) == ("mean", True, None)


def test_cls_pooling_read_from_config(tmp_path):
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (tmp_path / "modules.json").write_text(
        json.dumps([{"path": "pool", "type": "sentence_transformers.models.Pooling"}])
    )
    spec = read_pooling_spec(tmp_path)
    assert (spec.mode, spec.normalize) == ("cls", False)
