"""Run one batch job: check everything that can be checked before starting, stream, summarise."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
import ray.data
from ray.actor import ActorHandle
from ray.data import DataContext

from app.config import ModelConfig
from batch import embed, generate, output, sources
from batch.progress import JobProgress, start_counter
from batch.spec import ModelSpec, Overrides, check_fits, find_model, fit_concurrency, model_spec
from models.loader import resolve_source
from models.params import SamplingParams

logger = logging.getLogger("batch")


@dataclass
class Job:
    """One `python -m batch` invocation."""

    task: str  # "embed" | "generate"
    model: str
    input: str
    output: Path
    config: Path
    id_field: str = "id"
    text_field: str = "text"
    format: str | None = None
    truncate: bool = False
    batch_size: int = 256
    rows_per_file: int = 20_000
    tokenize_cpus: float = 1.0
    overrides: Overrides = field(default_factory=Overrides)
    address: str | None = None
    progress: bool = True
    dashboard: bool = False  # Ray's dashboard on the job's own local cluster
    sampling: SamplingParams = field(default_factory=SamplingParams)  # generate


@dataclass
class Summary:
    rows_written: int  # results written by this run
    errors_written: int  # bad rows recorded by this run (with an id)
    done_before: int  # rows committed by earlier runs into the same output, skipped
    errors_total: int  # lines of DIR/_errors.jsonl
    input_rows: int  # Parquet: exact; JSONL/CSV: lines
    seconds: float
    output: str

    @property
    def rows_per_s(self) -> float:
        return (self.rows_written + self.errors_written) / self.seconds if self.seconds else 0.0

    def render(self) -> str:
        return (
            f"{self.rows_written:,} rows written, {self.errors_written:,} errors recorded, {self.done_before:,} "
            f"done before and skipped, in {self.seconds:.1f} s ({self.rows_per_s:,.0f} rows/s)\n"
            f"results: {self.output}/*.parquet   errors ({self.errors_total:,}): {self.output}/{output.ERRORS_FILE}"
        )


def manifest(job: Job, files: list[str], fmt: str) -> dict:
    """What must be equal for a run to resume another's output."""
    fields = {
        "task": job.task,
        "model": job.model,
        "inputs": files,
        "format": fmt,
        "id_field": job.id_field,
        "text_field": job.text_field,
    }
    if job.task == "embed":
        return {**fields, "truncate": job.truncate}
    return {**fields, "sampling": dataclasses.asdict(job.sampling)}


def run(job: Job) -> Summary:
    """Check what can be checked before starting, stream the rows through the model, summarise."""
    cfg, options = find_model(job.config, job.model, job.task)
    files, fmt = sources.expand(job.input, job.format)
    out = Path(job.output).resolve()
    output.claim(out, manifest(job, files, fmt))
    _connect(job.address, job.dashboard)
    spec = model_spec(cfg, options, job.overrides, _stage_layers(cfg))
    cluster = ray.cluster_resources()
    check_fits(spec, cluster, job.tokenize_cpus)
    _data_context(out, job.id_field)
    done_before = output.committed_rows(out)
    rows = sources.count_rows(files, fmt)
    counter = start_counter() if job.progress else None  # an actor costs ~1% of a core: only for the bar
    ds = ray.data.read_datasource(_source(job, files, fmt, out, rows))
    ds, columns = _pipeline(ds, job, spec, cluster, counter)
    sink = output.ResultSink(str(out), job.id_field, columns, job.rows_per_file)
    start = time.perf_counter()
    with JobProgress(counter, max(0, sum(rows.values()) - done_before)):
        ds.write_datasink(sink)
    seconds = time.perf_counter() - start
    if counter is not None:
        ray.kill(counter)
    return Summary(
        rows_written=sink.totals["ok"],
        errors_written=sink.totals["errors"],
        done_before=done_before,
        errors_total=output.consolidate_errors(out, job.id_field),
        input_rows=sum(rows.values()),
        seconds=seconds,
        output=str(out),
    )


def _data_context(out: Path, id_field: str) -> None:
    ctx = DataContext.get_current()
    ctx.checkpoint_config = output.checkpoint_config(out, id_field)
    ctx.enable_progress_bars = False  # one bar for the job instead (batch/progress.py)
    ray_data_log = logging.getLogger("ray.data")
    ray_data_log.setLevel(logging.WARNING)  # its per-run INFO lines would tear the bar
    ray_data_log.addFilter(lambda r: "Progress bars disabled" not in r.getMessage())  # ours is on


def _source(job: Job, files: list[str], fmt: str, out: Path, rows: dict[str, int]) -> sources.RowsSource:
    check = sources.text_check if job.task == "embed" else generate.value_check
    fields = sources.Fields(job.id_field, job.text_field, check)
    if fmt == "parquet":
        fields = dataclasses.replace(fields, id_type=sources.parquet_id_type(files, job.id_field))
    return sources.RowsSource(files, fmt, fields, str(out / output.ERRORS_DIR), rows)


def _pipeline(
    ds: ray.data.Dataset, job: Job, spec: ModelSpec, cluster: dict, counter: ActorHandle | None
) -> tuple[ray.data.Dataset, list[str]]:
    """The model's stages appended to `ds`, and the result columns they make."""
    cfg, path = spec.cfg, str(resolve_source(spec.cfg.source))
    concurrency = [fit_concurrency(p, cluster, len(spec.pools), job.tokenize_cpus) for p in spec.pools]
    if job.task == "generate":
        (pool,) = spec.pools
        # vLLM batches inside one engine; on CPUs one engine per node unless told otherwise.
        conc = pool.concurrency or (concurrency[0] if pool.num_gpus else (1, 1))
        logger.info("pool: %s, concurrency %s", asdict(pool), conc)
        gjob = generate.GenerateJob(cfg=cfg, path=path, id_field=job.id_field, params=job.sampling)
        return generate.build(ds, gjob, pool, conc, job.batch_size, counter), generate.COLUMNS
    ejob = embed.embed_job(cfg, path, job.id_field, job.truncate)
    logger.info("pools: %s", [(asdict(p), c) for p, c in zip(spec.pools, concurrency)])
    return embed.build(ds, ejob, spec.pools, concurrency, job.batch_size, job.tokenize_cpus, counter), [embed.EMBEDDING]


def _stage_layers(cfg: ModelConfig) -> list[tuple[int, int]] | None:
    """An encoder's layer range per pool (a split LM stays one vLLM engine: its stages are vLLM's)."""
    if cfg.pipeline_stages == 1 or cfg.task == "generate":
        return None
    from models.pipeline_plan import load_config, plan

    # Where the online service cuts it (app/main.py): encoders run in float32, dtype is a generate setting.
    layout = plan(load_config(cfg.source), cfg.pipeline_stages, "float32", cfg.pipeline_boundaries)
    return [s.layers for s in layout.stages]


def _connect(address: str | None, dashboard: bool = False) -> None:
    """Join `address` (or $RAY_ADDRESS), else start a cluster of this machine for the job alone.

    That local cluster counts one CPU more than the machine has: on a resume, Ray Data's checkpoint
    filter actor claims a whole CPU to look ids up, and on 2 cores it and the model actor held both,
    so no read task could ever start (seen: a resume hung). Ray's CPUs are bookkeeping here; the
    model's threads are what use the cores. It starts without Ray's dashboard unless asked
    (`--dashboard`): the dashboard's processes took ~4.6% of a core of an idle cluster here, time the
    model's actor gets instead."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 1, log_to_driver=False, include_dashboard=dashboard)
