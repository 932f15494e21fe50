"""What each deployment gets, and from where: the class's `@serve.deployment`, `build_app`, and the
`deployments:` section of serve_config.yaml (which Serve applies last). No cluster needed."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from ray.serve._private.build_app import build_app as serve_build
from ray.serve.deployment import Deployment

from app.core.deadline import REPLICA_DRAIN_S
from app.ingress import Ingress
from app.main import build_app
from deployments.embedder import Embedder
from deployments.generator import Generator
from deployments.stage import Stage
from tests.helpers import ROOT

CLASSES = {"Ingress": Ingress, "Embedder": Embedder, "Generator": Generator, "Stage": Stage}
BOOKKEEPING = {"name", "_init_args", "_init_kwargs"}


def _app_config(path: str = "serve_config.yaml") -> dict:
    return yaml.safe_load((ROOT / path).read_text())["applications"][0]


def _built(app_config: dict) -> dict[str, Deployment]:
    built = serve_build(build_app(app_config["args"]), name=app_config["name"])
    return {d.name: d for d in built.deployments}


def _class_of(name: str) -> Deployment:
    return CLASSES["Stage" if name.startswith("Stage") else name.split("-", 1)[0]]


def _option(d: Deployment, key: str) -> Any:
    return d.ray_actor_options if key == "ray_actor_options" else getattr(d._deployment_config, key)


def effective(app_config: dict) -> dict[str, dict[str, Any]]:
    """Each deployment's options as Serve runs them: the code's, then the config file's on top
    (ray_actor_options replaced whole, as Serve's override does)."""
    out = {}
    overrides = {o["name"]: o for o in app_config.get("deployments", [])}
    for name, d in _built(app_config).items():
        cfg = d._deployment_config
        options = {
            "num_replicas": cfg.num_replicas,
            "max_ongoing_requests": cfg.max_ongoing_requests,
            "max_queued_requests": cfg.max_queued_requests,
            "health_check_period_s": cfg.health_check_period_s,
            "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
            "ray_actor_options": dict(d.ray_actor_options or {}),
        }
        options.update({k: v for k, v in overrides.get(name, {}).items() if k != "name"})
        out[name] = options
    return out


@pytest.mark.parametrize("path", ["serve_config.yaml", "serve_config.pipeline.yaml", "serve_config.gpu.yaml"])
def test_a_decorator_default_is_never_overridden_by_build_app(path):
    """A default in `@serve.deployment` that build_app always replaces would never apply: one
    source per option."""
    for name, built in _built(_app_config(path)).items():
        cls = _class_of(name)
        for key in cls._deployment_config.user_configured_option_names - BOOKKEEPING:
            assert _option(built, key) == _option(cls, key), (name, key)


@pytest.mark.parametrize("path", ["serve_config.yaml", "serve_config.pipeline.yaml", "serve_config.gpu.yaml"])
def test_the_config_file_names_only_deployments_the_app_builds(path):
    app_config = _app_config(path)
    built = _built(app_config)
    assert {o["name"] for o in app_config["deployments"]} <= set(built)


def _table(got: dict[str, dict[str, Any]]) -> dict[str, tuple]:
    return {
        name: (o["num_replicas"], o["max_ongoing_requests"], o["max_queued_requests"],
               o["ray_actor_options"].get("num_cpus"))
        for name, o in got.items()
    }  # fmt: skip


def test_what_each_deployment_of_the_pipeline_demos_gets():
    assert _table(effective(_app_config("serve_config.pipeline.yaml"))) == {
        "Ingress": (1, 512, 1024, 0),
        "Embedder-all-MiniLM-L6-v2-pipeline": (1, 64, 512, 0),
        "Stage0-all-MiniLM-L6-v2-pipeline": (1, 8, 64, 0),
        "Stage1-all-MiniLM-L6-v2-pipeline": (1, 8, 64, 0),
    }


@pytest.mark.parametrize("path", ["serve_config.yaml", "serve_config.pipeline.yaml", "serve_config.gpu.yaml"])
def test_every_deployment_bounds_its_queue_and_says_when_to_retry(path):
    """README Reliability: Serve's own 503s (a full queue) carry Retry-After, on every deployment built."""
    for name, options in effective(_app_config(path)).items():
        assert options["max_queued_requests"] > 0, (path, name)
        assert options.get("backpressure_config", {}).get("retry_after_s", 0) >= 1, (path, name)


@pytest.mark.parametrize("path", ["serve_config.yaml", "serve_config.pipeline.yaml", "serve_config.gpu.yaml"])
def test_a_stopping_ingress_or_generator_finishes_its_requests(path):
    """README Operating: a rolling update or scale-down kills an Ingress or Generator replica only after
    REPLICA_DRAIN_S (Serve's 20 s default cut completions a loaded machine ran for minutes)."""
    got = effective(_app_config(path))
    drained = [n for n in got if n == "Ingress" or n.startswith("Generator-")]
    assert "Ingress" in drained, got
    for name in drained:
        assert got[name]["graceful_shutdown_timeout_s"] >= REPLICA_DRAIN_S, (path, name)


def test_what_each_deployment_of_the_shipped_config_gets():
    got = effective(_app_config())
    assert _table(got) == {  # the lean default: two replicas
        "Ingress": (1, 512, 1024, 1),  # it holds all-MiniLM-L6-v2 (placement: ingress)
        "Generator-SmolLM2-135M-Instruct": (1, 64, 256, 1),
    }
    # The ingress sheds before Serve queues (README Reliability); a model's queue holds a full batch.
    assert _app_config()["args"]["max_inflight_requests"] < got["Ingress"]["max_ongoing_requests"]
    # The ingress computes the embedding model on shared cores: its idle OpenMP threads sleep (README Config
    # reference). vLLM's CPU worker binds its own threads to a core and keeps vLLM's defaults, as its own
    # server does.
    ingress_env = got["Ingress"]["ray_actor_options"]["runtime_env"]["env_vars"]
    assert ingress_env["OMP_WAIT_POLICY"] == "PASSIVE"
    # Its app runs on the replica's own event loop (the model computes in threads of its own); the
    # Generator keeps Serve's default.
    assert ingress_env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    assert "runtime_env" not in got["Generator-SmolLM2-135M-Instruct"]["ray_actor_options"]
