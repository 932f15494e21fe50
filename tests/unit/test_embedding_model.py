"""Model code without Ray: our pooled vectors are sentence-transformers' own."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
import torch

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


# Pipeline stages in-process: the same chain of encoder stages a split model's Stage deployments run.


@pytest.mark.parametrize("edges", [(0, 1, 6), (0, 3, 6), (0, 2, 5, 6)])
def test_split_encoder_gives_the_unsplit_vectors(model, bundled_path, edges):
    from models.encoder_stages import load_encoder_stage

    stages = [load_encoder_stage(bundled_path, a, b) for a, b in itertools.pairwise(edges)]
    split = EmbeddingModel(bundled_path, stages=stages)
    assert split.model is None  # the weights are in the stages only
    ids = model.tokenize(TEXTS)
    # One chunk of texts from 3 to 90 tokens: most rows are padding-heavy, and the mask travels stage to stage.
    assert len({len(i) for i in ids}) == len(ids)
    np.testing.assert_allclose(split.embed_ids(ids), model.embed_ids(ids), atol=1e-5)
    np.testing.assert_allclose(split.embed_ids(ids, chunk_size=2), model.embed_ids(ids), atol=1e-5)


def test_a_stage_passes_the_mask_on_with_its_hidden_states(bundled_path):
    from models.embedding import Hidden
    from models.encoder_stages import load_encoder_stage

    first, last = load_encoder_stage(bundled_path, 0, 2), load_encoder_stage(bundled_path, 2, 6)
    ids = torch.tensor([[101, 7592, 102, 0], [101, 7592, 2088, 102]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    middle = first(Hidden(ids, mask))
    assert middle.states.shape == (2, 4, 384) and torch.equal(middle.mask, mask)
    vectors = last(middle)
    assert vectors.shape == (2, 384)
    # The padded row is the unpadded text's vector; without its mask the padding would count.
    alone = last(first(Hidden(ids[:1, :3], mask[:1, :3])))
    torch.testing.assert_close(vectors[0], alone[0], atol=1e-5, rtol=0)
    unmasked = last(first(Hidden(ids, torch.ones_like(mask))))
    assert not torch.allclose(unmasked[0], alone[0], atol=1e-3)


def test_encoder_stage_ranges_and_architectures_are_checked(bundled_path):
    from models.encoder_stages import load_encoder_stage
    from models.smollm2 import ensure

    with pytest.raises(ValueError, match="not within the model's 6 layers"):
        load_encoder_stage(bundled_path, 3, 7)
    with pytest.raises(ValueError, match="BERT-like"):
        load_encoder_stage(ensure(), 0, 2)


def test_an_encoder_stage_built_on_the_meta_device_computes_its_buffers(bundled_path, model):
    from models.encoder_stages import load_encoder_stage

    stage = load_encoder_stage(bundled_path, 0, 3)
    assert not [n for n, t in [*stage.model.named_parameters(), *stage.model.named_buffers()] if t.is_meta]
    for name in ("position_ids", "token_type_ids"):  # not read from the checkpoint: computed
        assert torch.equal(getattr(stage.model.embeddings, name), getattr(model.model.embeddings, name)), name
    assert torch.equal(
        stage.model.encoder.layer[2].output.dense.weight, model.model.encoder.layer[2].output.dense.weight
    )


@pytest.mark.parametrize("users", [None, "true"])
def test_the_tokenizer_runs_on_the_calling_thread_unless_the_user_says_otherwise(bundled_path, monkeypatch, users):
    """Its thread pool would compete with the model for the cores (models/fast_tokens.single_threaded)."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", users or "")  # so the test's end restores the variable
    if users is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    EmbeddingModel(bundled_path, weights=False)
    assert os.environ["TOKENIZERS_PARALLELISM"] == (users or "false")
