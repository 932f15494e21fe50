"""The article's alternative for a backfill, run here as the peer of `python -m batch`: a Celery fan-out over
Redis, a chord of tasks, each worker process holding the model.

Runs in its own venv (artifacts/peers/celery-venv: Celery and its Redis client only), which sees this
repository and the project's venv through a .pth file, so the model code, torch and its numerics are
the very ones `python -m batch` runs. Each worker process loads the model as the batch job's actor
does (batch/embed.py, load_model: the config's runtime, PEER_THREADS threads); each task embeds a
slice of rows as that actor does (tokenize, embed_ids in chunks of the model's max_batch_size) and
writes its own Parquet part; the chord's callback adds up the rows.

Two shapes of the fan-out (benchmarks/batch_peers.py, `--shape`):
- `slices`: a chord of `embed_rows` tasks of 256 rows each, the model batching within a task: Celery
  tuned for this model, its broker cost spread over 256 rows;
- `records`: a task per record, as the article's farm (and a Celery app written for its records) runs
  it: `embed_record` over Celery's `starmap` (what its `chunks` primitive sends: 256 records to a
  message, each record its own call of the task, so its own forward pass), each message's vectors
  returned through the result backend to a `write_records` chained to it, which writes them. One
  callback for every record (a chord over all the chunks) failed at 100,000 rows: its message, every
  vector as JSON (~1 GB), was more than Redis took (connection reset, after 10 minutes of work).

    PEER_REDIS_URL=redis://127.0.0.1:PORT/0 celery -A benchmarks.celery_peer worker -c 2 ...
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from celery import Celery
from celery.signals import worker_process_init

from batch.embed import embed_job, load_model
from batch.spec import Overrides, find_model, model_spec
from models.embedding import EmbeddingModel
from models.loader import resolve_source

SERVE_CONFIG = Path(__file__).resolve().parents[1] / "serve_config.yaml"

app = Celery("rayinfer_peer", broker=os.environ.get("PEER_REDIS_URL"), backend=os.environ.get("PEER_REDIS_URL"))
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,  # a slow task does not hold back the queue behind it
    result_expires=3600,
)

_model: EmbeddingModel | None = None


@worker_process_init.connect
def _load(**_) -> None:
    """Each worker process holds the model, loaded once."""
    global _model
    cfg, options = find_model(SERVE_CONFIG, os.environ.get("PEER_MODEL", "all-MiniLM-L6-v2"), "embed")
    threads = int(os.environ.get("PEER_THREADS", "1"))
    (pool,) = model_spec(cfg, options, Overrides(threads=threads)).pools
    _model = load_model(embed_job(cfg, str(resolve_source(cfg.source))), pool)


@app.task
def embed_rows(ids: list[str], texts: list[str], out_dir: str, part: int, chunk_size: int) -> int:
    """Embed one slice of rows into out_dir/part-<part>.parquet (over-long texts are left out)."""
    tokens = _model.tokenize(texts)
    keep = [i for i, t in enumerate(tokens) if len(t) <= _model.max_tokens]
    vectors = _model.embed_ids([tokens[i] for i in keep], chunk_size)
    return _write_part([ids[i] for i in keep], vectors, out_dir, part)


def _write_part(ids: list[str], vectors: np.ndarray, out_dir: str, part: int) -> int:
    """Rows (id, float32 vector) into out_dir/part-<part>.parquet, as python -m batch writes them."""
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), _model.dim)
    pq.write_table(pa.table({"id": ids, "embedding": column}), Path(out_dir) / f"part-{part:06d}.parquet")
    return len(ids)


@app.task
def total(counts: list[int]) -> int:
    """The chord's callback: every slice is done."""
    return sum(counts)


@app.task
def embed_record(record_id: str, text: str) -> tuple[str, list[float]] | None:
    """One record, as a task per record embeds it (None: over-long, left out)."""
    tokens = _model.tokenize([text])
    if len(tokens[0]) > _model.max_tokens:
        return None
    return record_id, _model.embed_ids(tokens, 1)[0].tolist()


@app.task
def write_records(results: list[tuple[str, list[float]] | None], out_dir: str, part: int) -> int:
    """Chained to one message of embed_record calls: its vectors into out_dir/part-<part>.parquet."""
    rows = [r for r in results if r is not None]
    vectors = np.array([vec for _, vec in rows], dtype=np.float32).reshape(-1, _model.dim)
    return _write_part([i for i, _ in rows], vectors, out_dir, part)
