"""Model code on a GPU: what serve_config.gpu.yaml relies on. Marked `gpu`: skipped without CUDA
(tests/conftest.py), run on a GPU machine with `pytest -m gpu tests/gpu` (no Ray needed)."""

from __future__ import annotations

import pytest
import torch

from models.embedding import EmbeddingModel
from models.encoder_stages import load_encoder_stage
from tests.helpers import cosine, varied_texts

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cpu_model(bundled_path):
    return EmbeddingModel(bundled_path)


@pytest.fixture(scope="module")
def batch(cpu_model):
    return [cpu_model.truncate(ids) for ids in cpu_model.tokenize(varied_texts())]


def test_the_embedding_model_on_cuda_gives_the_cpus_vectors(bundled_path, cpu_model, batch):
    gpu = EmbeddingModel(bundled_path, device="cuda")
    assert next(gpu.model.parameters()).is_cuda
    assert cosine(gpu.embed_ids(batch), cpu_model.embed_ids(batch)).min() >= 0.99999


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights_on_cuda_stay_within_cosine_0_999_of_float32(bundled_path, cpu_model, batch, dtype):
    gpu = EmbeddingModel(bundled_path, device="cuda", dtype=dtype)
    assert next(gpu.model.parameters()).dtype == getattr(torch, dtype)
    got = gpu.embed_ids(batch)
    assert got.dtype.name == "float32"  # pooled in float32 whatever the weights
    assert cosine(got, cpu_model.embed_ids(batch)).min() >= 0.999


def test_encoder_stages_on_cuda_give_the_unsplit_models_vectors(bundled_path, cpu_model, batch):
    stages = [load_encoder_stage(bundled_path, 0, 3, "cuda"), load_encoder_stage(bundled_path, 3, 6, "cuda")]
    split = EmbeddingModel(bundled_path, weights=False, stages=stages)
    assert cosine(split.embed_ids(batch), cpu_model.embed_ids(batch)).min() >= 0.99999
