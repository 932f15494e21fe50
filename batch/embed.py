"""`python -m batch embed`: the Ray Data stages of an embedding job.

    read (RowsSource) ─► tokenize (CPU tasks) ─► model actor pool ─► write (ResultSink)
                                                └ or Stage0 pool ─► … ─► StageN-1 pool

The model code is the online service's: models/embedding.py's EmbeddingModel (tokenizer,
truncation rule, `embed_ids` with its length-sorted padded chunks of `max_batch_size`) on the
config's `runtime` (torch, or the same weights on ONNX Runtime, exported once into artifacts/onnx/
by models/onnx_encoder.py, or with bfloat16 matmuls as a TorchScript trace cached in artifacts/traced/,
as the online service loads it), and for a
model with `pipeline_stages > 1` models/encoder_stages.py's stages, one actor pool each, the
hidden states of each row going to the next pool in the dataset. A row that already carries an
error passes through every stage untouched. The tokenize tasks run batch/tokens.py, which imports
neither torch nor transformers.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
import torch
from ray.actor import ActorHandle
from ray.data import ActorPoolStrategy

from app.config import ModelConfig
from batch.sources import ERROR
from batch.spec import Pool
from batch.tokens import TOKENS, EmbedJob, full_tokenizer, tokenize
from models.embedding import EmbeddingModel
from models.fast_tokens import encode, load_fast_tokenizer

HIDDEN = "_hidden"  # a row's hidden states between stages, flattened [T * H] (list<float32>)
EMBEDDING = "embedding"
# Texts whose ids tokenizer.json alone must give as AutoTokenizer does before the tasks use it.
PROBES = (
    "Hello, world!",
    "  Leading and trailing spaces, TABS\tand\nnewlines  ",
    "Ünïcödé naïve café, Straße, 東京の天気は晴れ, Москва, مرحبا بالعالم, 🤖🚀",
    "def embed(texts: list[str]) -> np.ndarray:\n    return model.encode(texts)  # code",
    "word " * 600,
    "",
)


def embed_job(cfg: ModelConfig, path: str, id_field: str = "id", truncate: bool = False) -> EmbedJob:
    """The job of model `cfg` (checkpoint at `path`) as its online config runs it."""
    model = full_tokenizer(path, cfg.max_input_tokens)
    fast = load_fast_tokenizer(Path(path))
    return EmbedJob(
        name=cfg.name,
        path=path,
        id_field=id_field,
        max_input_tokens=cfg.max_input_tokens,
        truncate=truncate or cfg.truncate,
        chunk_size=cfg.max_batch_size,
        device=cfg.device,
        runtime=cfg.runtime,
        autocast=cfg.autocast,
        max_tokens=model.max_tokens,
        keep_last=model.keep_last,
        fast_tokenizer=fast is not None and encode(fast, list(PROBES)) == model.tokenize(list(PROBES)),
    )


def _device(job: EmbedJob, pool: Pool) -> str:
    if job.device != "auto":
        return job.device
    return "cuda" if pool.num_gpus > 0 and torch.cuda.is_available() else "cpu"


def load_model(job: EmbedJob, pool: Pool, tokenizer: bool = True) -> EmbeddingModel:
    """The whole model as the online service loads it (deployments/embedder.py, load_model): the config's
    runtime on each call's share of the pool's threads (torch's are process-wide, ONNX Runtime's per
    session). The raw limit and the Celery peer of the benchmark load it through here too. The job's
    actors are given token ids: without the tokenizer, an ONNX Runtime model, or a bfloat16 trace already in
    artifacts/traced/, loads without importing transformers (the actor's first batch came ~7 s sooner here
    on ONNX Runtime, ~3 s with the trace)."""
    torch.set_num_threads(pool.threads_per_call)
    return EmbeddingModel(
        Path(job.path),
        device=_device(job, pool),
        max_input_tokens=job.max_input_tokens,
        runtime=job.runtime,
        autocast=job.autocast,
        threads=pool.threads_per_call,
        tokenizer=tokenizer,
    )


class WholeModel:
    """An actor holding the whole model: EmbeddingModel.embed_ids, as the online service runs it, on
    `pool.calls` batches at once (threads of the actor, as the replica's concurrent_batches)."""

    def __init__(self, job: EmbedJob, pool: Pool, counter: ActorHandle | None = None):
        self.job, self.counter = job, counter
        self.model = load_model(job, pool, tokenizer=False)

    def __call__(self, batch: pa.Table) -> pa.Table:
        good = _good(batch)
        tokens = batch[TOKENS].filter(good).to_pylist()
        vectors = self.model.embed_ids(tokens, self.job.chunk_size) if tokens else np.empty((0, self.model.dim))
        _count(self.counter, batch.num_rows)
        return _vectors_table(batch, self.job.id_field, good, vectors, self.model.dim)


class EncoderStagePool:
    """An actor holding one stage (layers [start, end)) of a split encoder."""

    def __init__(self, job: EmbedJob, pool: Pool, first: bool, last: bool, counter: ActorHandle | None = None):
        torch.set_num_threads(pool.threads)
        self.job, self.first, self.last, self.counter = job, first, last, counter
        if pool.layers is None:
            raise ValueError(f"{pool.name}: a stage pool needs its layer range")
        start, end = pool.layers
        from models.encoder_stages import load_encoder_stage  # transformers: only where a split model runs

        self.stage = load_encoder_stage(Path(job.path), start, end, device=_device(job, pool))
        tokenizer = full_tokenizer(job.path, job.max_input_tokens)
        self.pad_id, self.dim = tokenizer.pad_id, tokenizer.dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        good = _good(batch)
        if self.first:
            rows = [np.asarray(t, dtype=np.int64) for t in batch[TOKENS].filter(good).to_pylist()]
        else:
            rows = [h.reshape(-1, self.dim) for h in _flat_rows(batch[HIDDEN].filter(good))]
        from models.encoder_stages import run_rows

        out = run_rows(self.stage, rows, self.job.chunk_size, self.pad_id) if rows else []
        if self.last:
            _count(self.counter, batch.num_rows)
            vectors = np.stack(out) if out else np.empty((0, self.dim), np.float32)
            return _vectors_table(batch, self.job.id_field, good, vectors, self.dim)
        return pa.table(
            {self.job.id_field: batch[self.job.id_field], HIDDEN: _scatter_lists(out, good), ERROR: batch[ERROR]}
        )


def _count(counter: ActorHandle | None, rows: int) -> None:
    if counter is not None:
        counter.add.remote(rows)  # fire and forget: progress only (batch/progress.py)


def _good(batch: pa.Table) -> pa.ChunkedArray:
    return pc.is_null(batch[ERROR])


def _flat_rows(column: pa.ChunkedArray) -> list[np.ndarray]:
    array = column.combine_chunks()
    values = array.values.to_numpy(zero_copy_only=False)
    offsets = array.offsets.to_numpy()
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(array))]


def _scatter_lists(rows: list[np.ndarray], good: pa.ChunkedArray) -> pa.Array:
    """A list<float32> column: each good row's flattened array in turn, null for the others."""
    mask = good.to_numpy(zero_copy_only=False)
    lengths = np.zeros(len(mask), dtype=np.int32)
    lengths[mask] = [r.size for r in rows]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate([r.ravel() for r in rows]).astype(np.float32) if rows else np.empty(0, np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), mask=pa.array(~mask))


def _vectors_table(batch: pa.Table, id_field: str, good: pa.ChunkedArray, vectors: np.ndarray, dim: int) -> pa.Table:
    mask = good.to_numpy(zero_copy_only=False)
    full = np.zeros((len(mask), dim), dtype=np.float32)
    full[mask] = vectors
    column = pa.FixedSizeListArray.from_arrays(pa.array(full.ravel()), dim, mask=pa.array(~mask))
    return pa.table({id_field: batch[id_field], EMBEDDING: column, ERROR: batch[ERROR]})


def tokenized(ds: ray.data.Dataset, job: EmbedJob, batch_size: int, cpus: float) -> ray.data.Dataset:
    """The tokenize stage, in blocks of at most `batch_size` rows: one block is one call of a model actor.

    A read task's block holds CHUNK_ROWS (4,096) rows, and a map task's output stays one block. An actor
    given a 4,096-row block runs its 16 batches one after another on one of its calls: at the end of a
    run the last blocks kept one call busy and the other idle (100,000 rows: 38 s of 271 at half speed).
    Ray Data's streaming repartition, fused into the tokenize task, cuts its output into batch-sized
    blocks instead."""
    ds = ds.map_batches(
        functools.partial(tokenize, job=job), batch_format="pyarrow", batch_size=batch_size, num_cpus=cpus
    )
    return ds.repartition(target_num_rows_per_block=batch_size)


def build(
    ds: ray.data.Dataset,
    job: EmbedJob,
    pools: list[Pool],
    concurrency: list[tuple[int, int]],
    batch_size: int,
    tokenize_cpus: float,
    counter: ActorHandle | None = None,
) -> ray.data.Dataset:
    """Append the tokenize stage and the model's actor pools to `ds`."""
    ds = tokenized(ds, job, batch_size, tokenize_cpus)
    for k, (pool, conc) in enumerate(zip(pools, concurrency)):
        fn: type[WholeModel | EncoderStagePool] = WholeModel if pool.layers is None else EncoderStagePool
        args: tuple[Any, ...] = (job, pool, counter)
        if pool.layers is not None:
            args = (job, pool, k == 0, k == len(pools) - 1, counter)
        ds = ds.map_batches(
            fn,
            fn_constructor_args=args,
            batch_format="pyarrow",
            batch_size=batch_size,
            compute=ActorPoolStrategy(
                min_size=conc[0],
                max_size=conc[1],
                max_concurrent_calls_per_actor=pool.calls,
                enable_true_multi_threading=pool.calls > 1,
            ),
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus or None,
            runtime_env={"env_vars": pool.env} if pool.env else None,
        )
    return ds
