"""Embedding on ONNX Runtime, with bfloat16 matmuls, and inside the ingress (`placement: ingress`), without
Ray: sentence-transformers' vectors (bfloat16: within cosine 0.999), bad jobs isolated, two batches at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from app.config import AppConfig, ModelConfig
from app.core.errors import InputTooLong
from app.main import build_app
from batch.spec import find_model
from deployments.colocated import LocalEmbedder
from deployments.types import EmbedJob
from models import embedding
from models.embedding import EmbeddingModel, TracedEncoder
from tests.helpers import MODEL, ROOT, SERVE_CONFIG, cosine, varied_texts

SOURCE = f"bundled:{MODEL}"


@pytest.fixture(scope="module")
def onnx_model(bundled_path):
    return EmbeddingModel(bundled_path, runtime="onnx", threads=1)


def test_onnx_runtime_gives_sentence_transformers_vectors_on_varied_text(onnx_model, reference):
    texts = varied_texts()
    assert len(texts) >= 180
    ids = [onnx_model.truncate(x) for x in onnx_model.tokenize(texts)]
    got = onnx_model.embed_ids(ids)
    want = reference(texts)  # sentence-transformers truncates at the same 256 tokens
    assert cosine(got, want).min() >= 0.99999
    assert np.abs(np.linalg.norm(got, axis=1) - 1).max() < 1e-5  # normalised, as the checkpoint says


@pytest.fixture(scope="module")
def bf16_model(bundled_path):
    return EmbeddingModel(bundled_path, runtime="torch", autocast="bfloat16")


def test_bfloat16_matmuls_stay_within_cosine_0_999_of_sentence_transformers_on_varied_text(
    bf16_model, reference, bundled_path
):
    # `runtime: auto`'s choice on a CPU with native bfloat16 (emulated, slower, elsewhere: the same numbers).
    assert isinstance(bf16_model.stages[0], TracedEncoder)  # traced once, on [2, 8] ids
    texts = varied_texts()
    ids = [bf16_model.truncate(x) for x in bf16_model.tokenize(texts)]
    assert max(map(len, ids)) == 256 and min(map(len, ids)) <= 3
    want = reference(texts)
    whole = bf16_model.embed_ids(ids)  # chunks of 64, each padded to its longest
    assert cosine(whole, want).min() >= 0.999
    assert np.abs(np.linalg.norm(whole, axis=1) - 1).max() < 1e-5  # pooled and normalised in float32
    float32 = EmbeddingModel(bundled_path).embed_ids(ids)
    assert np.abs(whole - float32).max() > 1e-4  # the matmuls did run in bfloat16
    # Any batch shape takes the trace: one text at a time, and odd chunks of mixed lengths. (A CPU without
    # native bfloat16 emulates it, slowly: a sample of the texts.)
    assert cosine(np.concatenate([bf16_model.embed_ids([x]) for x in ids[:20]]), want[:20]).min() >= 0.999
    some = ids[::3]
    assert max(map(len, some)) == 256
    assert cosine(bf16_model.embed_ids(some, chunk_size=7), want[::3]).min() >= 0.999


def test_the_bfloat16_trace_is_made_once_and_loads_from_its_cache_without_transformers(
    bf16_model, bundled_path, tmp_path, monkeypatch
):
    ids = [bf16_model.truncate(x) for x in bf16_model.tokenize(varied_texts()[::4])]
    want = bf16_model.embed_ids(ids, chunk_size=16)
    made = TracedEncoder.load(bundled_path, bf16_model.spec, "bfloat16", cache=tmp_path)  # traced, then saved
    (saved,) = tmp_path.glob("*/encoder.pt")
    stamp = saved.stat().st_mtime_ns
    again = TracedEncoder.load(bundled_path, bf16_model.spec, "bfloat16", cache=tmp_path)  # read back
    assert saved.stat().st_mtime_ns == stamp and list(tmp_path.glob("*/*")) == [saved]  # not traced again
    monkeypatch.setattr(bf16_model, "stages", [made])
    np.testing.assert_array_equal(bf16_model.embed_ids(ids, chunk_size=16), want)
    monkeypatch.setattr(bf16_model, "stages", [again])
    np.testing.assert_array_equal(bf16_model.embed_ids(ids, chunk_size=16), want)
    saved.write_bytes(b"not a TorchScript archive")  # a file torch cannot read: traced and written again
    monkeypatch.setattr(
        bf16_model, "stages", [TracedEncoder.load(bundled_path, bf16_model.spec, "bfloat16", cache=tmp_path)]
    )
    np.testing.assert_array_equal(bf16_model.embed_ids(ids, chunk_size=16), want)
    assert saved.stat().st_size > 1_000_000
    # A process given token ids (the batch job's model actor) loads the cached graph, not transformers.
    code = (
        "import sys; from pathlib import Path; from models.embedding import EmbeddingModel; "
        f"m = EmbeddingModel(Path({str(bundled_path)!r}), runtime='torch', autocast='bfloat16', tokenizer=False); "
        f"m.embed_ids({ids[:3]!r}); print(type(m.stages[0]).__name__, 'transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.split() == ["TracedEncoder", "False"]


def test_runtime_auto_takes_bfloat16_matmuls_only_where_the_cpu_has_them(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(embedding, "native_bf16", lambda: True)
    assert embedding.resolve_runtime("auto", None, cpu) == ("torch", "bfloat16")
    assert embedding.resolve_runtime("auto", None, cuda) == ("torch", None)
    monkeypatch.setattr(embedding, "native_bf16", lambda: False)
    assert embedding.resolve_runtime("auto", None, cpu) == ("onnx", None)
    assert embedding.resolve_runtime("onnx", None, cpu) == ("onnx", None)  # explicit: float32 everywhere
    assert embedding.resolve_runtime("torch", "bfloat16", cpu) == ("torch", "bfloat16")


def test_the_shipped_config_resolves_auto_where_the_model_loads():
    shipped, _ = find_model(SERVE_CONFIG, MODEL, "embed")
    assert shipped.runtime == "auto" and shipped.autocast is None
    local = LocalEmbedder(shipped)
    want = ("torch", "bfloat16") if embedding.native_bf16() else ("onnx", None)
    assert (local.model.runtime, local.model.autocast) == want


def _local(**options) -> LocalEmbedder:
    cfg = ModelConfig(name=MODEL, task="embed", source=SOURCE, runtime="onnx", placement="ingress", num_threads=2,
                      **options)  # fmt: skip
    return LocalEmbedder(cfg)


def test_a_bad_job_gets_its_own_error_and_its_batch_mates_their_vectors(reference):
    local = _local()
    jobs = [EmbedJob(texts=["first text"]), EmbedJob(texts=["word " * 600]), EmbedJob(texts=["third", "fourth"])]
    first, bad, last = asyncio.run(local.embed_many(jobs))
    assert isinstance(bad, InputTooLong) and bad.param == "input"
    assert cosine(first.vectors, reference(["first text"])).min() >= 0.99999
    assert cosine(last.vectors, reference(["third", "fourth"])).min() >= 0.99999
    assert local.batches.stats["jobs"] == 3 and local.batches.stats["batches"] == 1
    assert local.batches.stats["mixed_batches"] == 1  # the refused job sat beside computed ones
    asyncio.run(local.embed_many(jobs[::2]))  # all good: not a mixed batch
    assert local.batches.stats["mixed_batches"] == 1 and local.batches.stats["batches"] == 2


def test_a_batch_in_the_ingress_records_its_queue_wait_once_per_forward(monkeypatch):
    # The dashboard's queue panels read phase="queue"; in the ingress it is a batch's wait for a slot.
    local = _local()
    waits: list[float] = []
    monkeypatch.setattr(local.batches, "observe_queue", waits.append)
    asyncio.run(local.embed_many([EmbedJob(texts=["one"]), EmbedJob(texts=["two", "three"])]))
    assert len(waits) == 1 and waits[0] >= 0


def test_check_health_runs_a_real_forward_and_fails_on_an_unusable_vector():
    local = _local()
    forwards: list[list[list[int]]] = []
    embed_ids = local.model.embed_ids

    def counted(ids: list[list[int]], *args: object) -> np.ndarray:
        forwards.append(ids)
        return embed_ids(ids, *args)

    local.model.embed_ids = counted  # type: ignore[method-assign]
    asyncio.run(local.check_health())
    assert len(forwards) == 1 and len(forwards[0]) == 1  # one text through the model
    local.model.embed_ids = lambda ids, *args: np.full((len(ids), 384), np.nan, dtype=np.float32)  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="unusable"):
        asyncio.run(local.check_health())


def test_two_batches_compute_at_once_each_on_its_own_thread():
    """concurrent_batches: 2 — the second batch's forward starts while the first's is still running
    (a barrier both must reach; one at a time would time out)."""
    local = _local(concurrent_batches=2)
    barrier = threading.Barrier(2, timeout=30)
    forward = local.model.embed_ids

    def meeting(batch, chunk):
        barrier.wait()  # raises BrokenBarrierError if the other forward is not running meanwhile
        return forward(batch, chunk)

    local.model.embed_ids = meeting  # type: ignore[method-assign]

    async def both():
        return await asyncio.gather(
            local.embed_many([EmbedJob(texts=["a"])]), local.embed_many([EmbedJob(texts=["b"])])
        )

    a, b = asyncio.run(both())
    assert a[0].vectors.shape == b[0].vectors.shape == (1, 384)
    assert local.batches.stats["max_batches_in_flight"] == 2


def test_one_batch_at_a_time_when_concurrent_batches_is_1():
    local = _local(concurrent_batches=1)
    running, most = 0, 0
    lock = threading.Lock()
    forward = local.model.embed_ids

    def counted(batch, chunk):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return forward(batch, chunk)
        finally:
            with lock:
                running -= 1

    local.model.embed_ids = counted  # type: ignore[method-assign]

    async def many():
        return await asyncio.gather(*(local.embed_many([EmbedJob(texts=[f"t{i}"])]) for i in range(6)))

    asyncio.run(many())
    assert most == 1


def test_a_model_placed_in_the_ingress_gets_no_deployment():
    args = {"models": [{"name": MODEL, "task": "embed", "source": SOURCE, "placement": "ingress"}]}
    app = build_app(args)
    ingress = app._bound_deployment
    assert ingress.name == "Ingress" and ingress.init_args[1] == {}


@pytest.mark.parametrize(
    "entry,field",
    [
        ({"task": "generate", "source": "built:smollm2-135m-instruct", "runtime": "onnx"}, "runtime"),
        ({"task": "generate", "source": "built:smollm2-135m-instruct", "placement": "ingress"}, "placement"),
        ({"task": "generate", "source": "built:smollm2-135m-instruct", "overlap_min_batch": 4}, "overlap_min_batch"),
        ({"task": "embed", "source": SOURCE, "pipeline_stages": 2, "placement": "ingress"}, "placement"),
        ({"task": "embed", "source": SOURCE, "pipeline_stages": 2, "runtime": "onnx"}, "runtime"),
        ({"task": "embed", "source": SOURCE, "runtime": "onnx", "device": "cuda"}, "runtime"),
        ({"task": "embed", "source": SOURCE, "runtime": "onnx", "autocast": "bfloat16"}, "autocast"),
        ({"task": "embed", "source": SOURCE, "runtime": "auto", "autocast": "bfloat16"}, "autocast"),
        ({"task": "embed", "source": SOURCE, "runtime": "auto", "dtype": "bfloat16"}, "runtime"),
        ({"task": "embed", "source": SOURCE, "pipeline_stages": 2, "autocast": "bfloat16"}, "autocast"),
        ({"task": "generate", "source": "built:smollm2-135m-instruct", "autocast": "bfloat16"}, "autocast"),
    ],
)
def test_embedding_only_options_are_refused_elsewhere_with_the_field_named(entry, field):
    with pytest.raises(ValidationError, match=field):
        AppConfig.model_validate({"models": [{"name": "m", **entry}]})
