"""vLLM engine arguments and sampling parameters from rayinfer's config, and the GPU profile's deployment
options: checked without starting an engine or needing a GPU."""

from __future__ import annotations

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from vllm import AsyncEngineArgs
from vllm.sampling_params import RequestOutputKind

from app.config import AppConfig, ModelConfig
from app.main import build_app, placement
from models.loader import resolve_source
from models.params import SamplingParams
from models.vllm_engine import UNIPROC_EXECUTOR, engine_env, engine_kwargs, to_vllm
from tests.helpers import SERVE_CONFIG

GPU_CONFIG = SERVE_CONFIG.with_name("serve_config.gpu.yaml")


def app_of(path) -> dict:
    return yaml.safe_load(path.read_text())["applications"][0]


def model(path, name: str) -> ModelConfig:
    return next(m for m in AppConfig.model_validate(app_of(path)["args"]).models if m.name == name)


def test_the_default_model_runs_as_configured_on_one_process():
    cfg = model(SERVE_CONFIG, "SmolLM2-135M-Instruct")
    kwargs = engine_kwargs(cfg, "/m")
    assert {k: kwargs[k] for k in ("model", "dtype", "max_model_len", "max_num_seqs", "enforce_eager")} == {
        "model": "/m",
        "dtype": "float32",
        "max_model_len": 2048,
        "max_num_seqs": 32,
        "enforce_eager": True,
    }
    assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"]) == (1, 1)
    # The model computes in the engine core process: no worker process, no busy-poll. Its threads are
    # OMP_NUM_THREADS, which Ray sets from the replica's num_cpus, and `num_threads` overrides.
    assert kwargs["distributed_executor_backend"] == UNIPROC_EXECUTOR
    assert engine_env(cfg) == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert engine_env(cfg.model_copy(update={"num_threads": 2}))["OMP_NUM_THREADS"] == "2"
    AsyncEngineArgs(**kwargs)  # every argument is one vLLM knows


def test_the_cpu_platform_keeps_the_in_process_executor():
    """vLLM's CPU platform turns the name "uni" into "mp"; the class path survives its config checks."""
    from vllm.v1.executor.abstract import Executor
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    cfg = model(SERVE_CONFIG, "SmolLM2-135M-Instruct")
    uni = AsyncEngineArgs(**{**engine_kwargs(cfg, resolve_source(cfg.source)), "distributed_executor_backend": "uni"})
    assert Executor.get_class(uni.create_engine_config()) is not UniProcExecutor
    ours = AsyncEngineArgs(**engine_kwargs(cfg, resolve_source(cfg.source)))
    assert Executor.get_class(ours.create_engine_config()) is UniProcExecutor


def test_llama_70b_is_split_by_vllm_on_ray_across_eight_gpus():
    cfg = model(GPU_CONFIG, "Llama-3-70B-Instruct")
    kwargs = engine_kwargs(cfg, "/m")
    assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"]) == (4, 2)
    assert kwargs["distributed_executor_backend"] == "ray" and kwargs["gpu_memory_utilization"] == 0.9
    assert kwargs["enforce_eager"] is False and kwargs["dtype"] == "bfloat16"
    AsyncEngineArgs(**kwargs)


def test_the_gpu_profile_builds_its_deployment_options_without_a_gpu():
    raw = yaml.safe_load(GPU_CONFIG.read_text())
    ServeDeploySchema.model_validate(raw)
    app = app_of(GPU_CONFIG)
    handles = build_app(app["args"])._bound_deployment.init_args[1]
    llama = handles["Llama-3-70B-Instruct"]._bound_deployment
    replica = llama._replica_config
    bundles = replica.placement_group_bundles
    assert bundles == [{"CPU": 1.0, "GPU": 1.0}] + [{"GPU": 1.0}] * 7  # one GPU per vLLM worker
    assert replica.placement_group_strategy == "PACK" and not replica.ray_actor_options.get("num_gpus")
    # The file's overrides are the same placement group, and the replica fits in the first bundle.
    override = next(d for d in app["deployments"] if d["name"] == llama.name)
    assert override["placement_group_bundles"] == bundles
    assert override["ray_actor_options"]["num_cpus"] <= bundles[0]["CPU"]
    assert override["ray_actor_options"]["num_gpus"] == 0
    # A model on one GPU needs no placement group: the replica holds its GPU itself.
    small = handles["SmolLM2-135M-Instruct"]._bound_deployment._replica_config
    assert small.placement_group_bundles is None
    assert (
        next(d for d in app["deployments"] if d["name"] == "Generator-SmolLM2-135M-Instruct")["ray_actor_options"][
            "num_gpus"
        ]
        == 1
    )


def test_a_split_model_on_cpu_gets_cpu_bundles():
    cfg = ModelConfig(name="m", task="generate", source="x", tensor_parallel_size=2)
    assert placement(cfg)["placement_group_bundles"] == [{"CPU": 2.0}, {"CPU": 1.0}]
    assert placement(ModelConfig(name="m", task="generate", source="x")) == {}


def test_engine_kwargs_may_not_repeat_the_models_own_fields():
    cfg = ModelConfig(name="m", task="generate", source="x", engine_kwargs={"dtype": "float16"})
    with pytest.raises(ValueError, match="engine_kwargs: dtype"):
        engine_kwargs(cfg, "/m")
    extra = ModelConfig(name="m", task="generate", source="x", engine_kwargs={"enable_prefix_caching": False})
    assert engine_kwargs(extra, "/m")["enable_prefix_caching"] is False


def test_generate_only_fields_are_refused_on_encoders_and_vice_versa():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        ModelConfig(name="e", task="embed", source="x", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="pipeline_microbatches"):
        ModelConfig(name="g", task="generate", source="x", pipeline_stages=2, pipeline_microbatches=2)


def test_sampling_params_map_every_field_onto_vllms():
    params = SamplingParams(
        max_tokens=None,
        temperature=0.5,
        top_p=0.8,
        seed=3,
        stop=("\n",),
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        min_tokens=4,
        ignore_eos=True,
        logprobs=2,
    )
    v = to_vllm(params, 32, seed=5)
    assert (v.max_tokens, v.temperature, v.top_p, v.seed, v.stop) == (32, 0.5, 0.8, 5, ["\n"])
    assert (v.presence_penalty, v.frequency_penalty, v.min_tokens, v.ignore_eos, v.logprobs) == (0.5, -0.5, 4, True, 2)
    assert v.output_kind == RequestOutputKind.DELTA  # each output carries only its new text
    assert to_vllm(SamplingParams(seed=9), 8).seed == 9 and not to_vllm(SamplingParams(), 8).stop
