"""A checkpoint's fast tokenizer on the `tokenizers` library alone, and the truncation rule.

transformers' AutoTokenizer wraps the same `tokenizer.json`; loading it here gives the same ids
without importing torch and transformers (importing those took ~8 s of CPU per process on this
2-core machine), for processes that only tokenize: the batch job's tokenize tasks. Whoever uses it
checks first that it agrees with AutoTokenizer on the checkpoint (batch/embed.py, embed_job).
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer


def single_threaded() -> None:
    """Tokenize on the calling thread unless the user's TOKENIZERS_PARALLELISM says otherwise.

    Whoever tokenizes here shares the cores with a model computing on all of them (an ingress or
    Embedder replica, a batch task holding one CPU): the tokenizer's own thread pool only competes with
    it. Measured: a batch tokenize task did the same batches in 26% less CPU on one thread; texts to
    vectors in-process (bench's raw limit, bf16, 2 cores) 3,109 and 3,150 against 2,997 and 3,047 texts/s;
    the shipped ingress +1.5% texts/s at 32 texts per request (BENCHMARKS.md)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_fast_tokenizer(path: Path) -> Tokenizer | None:
    """The checkpoint's tokenizer.json, untruncated and unpadded, single-threaded (`single_threaded`);
    None if it has none."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    single_threaded()
    tokenizer = Tokenizer.from_file(str(file))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def encode(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids with special tokens, untruncated, as AutoTokenizer's `__call__` gives them. (`encode_batch_fast`
    skips the character offsets nothing here reads: 25 against 30 µs of CPU per ~17-token text here.)"""
    return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=True)]


def truncate_ids(ids: list[int], max_tokens: int, keep_last: bool) -> list[int]:
    """Cut to `max_tokens`, keeping the final special token (`keep_last`), as the tokenizer's truncation does."""
    if len(ids) <= max_tokens:
        return ids
    tail = ids[-1:] if keep_last else []
    return ids[: max_tokens - len(tail)] + tail
