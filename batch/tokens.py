"""The tokenize stage of `python -m batch embed`, and the job every stage of it gets.

This module imports neither torch nor transformers: a tokenize task's worker runs the checkpoint's
fast tokenizer on the `tokenizers` library (models/fast_tokens.py), the same ids as the online
service's AutoTokenizer (the driver checks that on the checkpoint before the job starts, else
the tasks load AutoTokenizer). Importing the whole model code took ~11 s of CPU per worker here,
at the moment the model's actor was importing it too: the actor started its first batch ~16 s
after the job did.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from batch.sources import ERROR, VALUE
from models.fast_tokens import encode, load_fast_tokenizer, truncate_ids

TOKENS = "_tokens"  # token ids (list<int32>) out of the tokenizer


@dataclass(frozen=True)
class EmbedJob:
    """What every stage of an embedding job needs to know (picklable: it goes to each task and actor)."""

    name: str
    path: str  # the checkpoint directory
    id_field: str
    max_input_tokens: int | None
    truncate: bool
    chunk_size: int  # rows per forward pass (the model's max_batch_size)
    device: str  # "auto", "cpu" or "cuda"
    runtime: str = "torch"  # "torch", "onnx" or "auto" (the config's; a split model is torch)
    autocast: str | None = None  # runtime torch: the matmuls' dtype (the config's)
    max_tokens: int = 512  # the model's limit (EmbeddingModel.max_tokens)
    keep_last: bool = True  # truncation keeps the closing special token (EmbeddingModel.keep_last)
    fast_tokenizer: bool = False  # tokenizer.json alone gives AutoTokenizer's ids (checked by the driver)


@functools.lru_cache(maxsize=4)
def full_tokenizer(path: str, max_input_tokens: int | None) -> Any:
    """The model code's tokenizer (EmbeddingModel without weights): torch and transformers."""
    from models.embedding import EmbeddingModel

    return EmbeddingModel(Path(path), weights=False, max_input_tokens=max_input_tokens)


@functools.lru_cache(maxsize=4)
def _fast(path: str) -> Any:
    return load_fast_tokenizer(Path(path))


def token_ids(texts: list[str], job: EmbedJob) -> list[list[int]]:
    if job.fast_tokenizer:
        return encode(_fast(job.path), texts)
    return full_tokenizer(job.path, job.max_input_tokens).tokenize(texts)


def tokenize(batch: pa.Table, job: EmbedJob) -> pa.Table:
    """Token ids for the good rows; an over-long text is cut (`truncate`) or becomes an error."""
    errors = batch[ERROR].to_pylist()
    todo = [i for i, e in enumerate(errors) if e is None]
    texts = batch[VALUE].to_pylist()
    tokens: list[list[int] | None] = [None] * len(errors)
    for i, ids in zip(todo, token_ids([texts[i] for i in todo], job) if todo else []):
        if len(ids) <= job.max_tokens or job.truncate:
            tokens[i] = truncate_ids(ids, job.max_tokens, job.keep_last)
        else:
            errors[i] = (
                f"text has {len(ids)} tokens; model {job.name!r} accepts at most {job.max_tokens} "
                "(shorten it, or run with --truncate)"
            )
    return pa.table(
        {
            job.id_field: batch[job.id_field],
            TOKENS: pa.array(tokens, pa.list_(pa.int32())),
            ERROR: pa.array(errors, pa.string()),
        }
    )
