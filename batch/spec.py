"""A model of `serve_config.yaml`, as a batch job runs it: its config and each actor pool's resources.

The model's entry (`applications[].args.models[]`) is validated with the online service's
`ModelConfig`, so source, runtime, truncation, threads and pipeline stages are the same. Resources
come from the same file's `deployments:` section: `Embedder-<name>` / `Generator-<name>` for a whole
model (`Ingress` for an embedding model with `placement: ingress`, which runs inside it online),
`Stage<k>-<name>` for each stage of a split one (`ray_actor_options`: `num_cpus`,
`num_gpus`, `runtime_env.env_vars`); command-line flags override them for every model pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml
from pydantic import ValidationError

from app.config import ModelConfig

# What the deployments default to when the config names no ray_actor_options (deployments/*.py).
DEFAULT_CPUS = {"whole": 1.0, "stage": 0.0}


class SpecError(ValueError):
    """The model cannot be run as asked: unknown name, wrong task, invalid config."""


@dataclass(frozen=True)
class Pool:
    """One actor pool: a whole model or one stage of it."""

    name: str
    num_cpus: float
    num_gpus: float
    threads: int  # the actor's threads, all its calls together
    env: dict[str, str] = field(default_factory=dict)
    layers: tuple[int, int] | None = None  # a stage's [start, end); None for the whole model
    concurrency: tuple[int, int] | None = None  # (min, max) actors; None: fit the cluster
    calls: int = 1  # batches one actor computes at once, each on threads // calls threads (concurrent_batches)

    @property
    def threads_per_call(self) -> int:
        return max(1, self.threads // self.calls)


@dataclass(frozen=True)
class ModelSpec:
    cfg: ModelConfig
    pools: list[Pool]


@dataclass(frozen=True)
class Overrides:
    """Command-line resource flags; None keeps the config's."""

    num_cpus: float | None = None
    num_gpus: float | None = None
    threads: int | None = None
    concurrency: tuple[int, int] | None = None
    calls: int | None = None


def find_model(config_path: Path, name: str, task: str) -> tuple[ModelConfig, dict[str, dict]]:
    """The model's validated config and the actor options of every deployment in its application."""
    data = yaml.safe_load(Path(config_path).read_text()) or {}
    seen = []
    for app in data.get("applications", []):
        models = (app.get("args") or {}).get("models") or []
        for entry in models:
            seen.append(entry.get("name"))
            if entry.get("name") != name:
                continue
            try:
                cfg = ModelConfig.model_validate(entry)
            except ValidationError as exc:
                raise SpecError(f"{config_path}: model {name!r}: {exc}") from exc
            if cfg.task != task:
                raise SpecError(
                    f"model {name!r} has task {cfg.task!r}; `python -m batch {task}` needs a {task!r} model"
                )
            options = {d["name"]: d.get("ray_actor_options") or {} for d in app.get("deployments") or []}
            return cfg, options
    raise SpecError(f"no model {name!r} in {config_path}; models there: {', '.join(map(str, seen)) or 'none'}")


def model_spec(
    cfg: ModelConfig, options: dict[str, dict], overrides: Overrides, stage_layers: list[tuple[int, int]] | None = None
) -> ModelSpec:
    """The model's actor pools: one for a whole model, one per stage (`stage_layers`) for a split one."""
    if cfg.pipeline_stages == 1 or cfg.task == "generate":  # vLLM runs a split LM inside its one engine
        home = "Ingress" if cfg.placement == "ingress" else cfg.deployment_name
        pools = [_pool(cfg, home, options, "whole", None)]
    elif stage_layers is None:
        raise SpecError(f"model {cfg.name!r}: pipeline_stages {cfg.pipeline_stages} needs each stage's layers")
    else:
        pools = [_pool(cfg, cfg.stage_name(k), options, "stage", layers) for k, layers in enumerate(stage_layers)]
    return ModelSpec(cfg, [_override(p, overrides) for p in pools])


def _pool(cfg: ModelConfig, name: str, options: dict[str, dict], kind: str, layers: tuple[int, int] | None) -> Pool:
    opts = options.get(name, {})
    cpus = float(opts.get("num_cpus", DEFAULT_CPUS[kind]))
    # The deployment's environment, less Serve's own settings (RAY_SERVE_*: a Ray Data actor is no replica).
    env = {
        k: v
        for k, v in ((opts.get("runtime_env") or {}).get("env_vars") or {}).items()
        if not k.startswith("RAY_SERVE_")
    }
    threads = cfg.num_threads or max(1, int(cpus))
    # A whole model computes concurrent_batches batches at once in one actor, as its replica does online.
    calls = cfg.concurrent_batches if kind == "whole" and cfg.task == "embed" else 1
    return Pool(
        name=name,
        num_cpus=cpus,
        num_gpus=float(opts.get("num_gpus", 0)),
        threads=threads,
        env=env,
        layers=layers,
        calls=calls,
    )


def _override(pool: Pool, o: Overrides) -> Pool:
    return replace(
        pool,
        num_cpus=pool.num_cpus if o.num_cpus is None else o.num_cpus,
        num_gpus=pool.num_gpus if o.num_gpus is None else o.num_gpus,
        threads=pool.threads if o.threads is None else o.threads,
        concurrency=o.concurrency,
        calls=pool.calls if o.calls is None or pool.layers is not None else o.calls,
    )


def fit_concurrency(pool: Pool, cluster: dict[str, float], pools: int, task_cpus: float = 0.0) -> tuple[int, int]:
    """(1, as many actors as the cluster holds): GPUs over num_gpus, else the CPUs left beside one
    read/tokenize/write task (`task_cpus`) over the threads an actor uses, shared between the model's
    `pools` pools."""
    if pool.concurrency is not None:
        return pool.concurrency
    if pool.num_gpus > 0:
        most = int(cluster.get("GPU", 0) // pool.num_gpus)
    else:
        most = int((cluster.get("CPU", 1) - task_cpus) // max(pool.num_cpus, pool.threads, 1))
    return 1, max(1, most // pools)


def check_fits(spec: ModelSpec, cluster: dict[str, float], task_cpus: float) -> None:
    """A run whose pools can never all be placed would hang: say so before starting. Besides the model's
    first actor of each pool, the cluster must hold one task (read, tokenize, write: `task_cpus`) and
    Ray Data's checkpoint filter actor (1 CPU, on a resume)."""
    for pool in spec.pools:
        if pool.num_gpus > cluster.get("GPU", 0):
            raise SpecError(
                f"{pool.name} needs {pool.num_gpus:g} GPU per actor; the cluster has "
                f"{cluster.get('GPU', 0):g} (override with --num-gpus)"
            )
    need = sum(p.num_cpus for p in spec.pools) + task_cpus + 1
    if need > cluster.get("CPU", 0):
        raise SpecError(
            f"the model's pools ({', '.join(f'{p.name}: {p.num_cpus:g}' for p in spec.pools)} CPU), a "
            f"{task_cpus:g}-CPU task and Ray Data's 1-CPU checkpoint filter need {need:g} CPUs; the "
            f"cluster has {cluster.get('CPU', 0):g} (lower --num-cpus or --tokenize-cpus)"
        )
