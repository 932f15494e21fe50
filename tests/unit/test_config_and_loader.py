"""Config validation, source resolution, serve_config.yaml against Ray's own schema."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from app.config import AppConfig, ModelConfig
from app.main import build_app
from models.loader import SourceError, resolve_source
from tests.helpers import MODEL, SERVE_CONFIG


def test_default_config_serves_the_bundled_and_the_built_model():
    embed, generate = AppConfig().models
    assert (embed.name, embed.task, embed.source) == (MODEL, "embed", f"bundled:{MODEL}")
    assert (generate.name, generate.task, generate.source) == ("tiny-lm", "generate", "built:tiny-lm")
    assert (embed.deployment_name, generate.deployment_name) == (f"Embedder-{MODEL}", "Generator-tiny-lm")


@pytest.mark.parametrize(
    "args,words",
    [
        ({"models": []}, "at least 1"),
        ({"models": [{"name": "a", "task": "embed", "source": "x"}] * 2}, "repeated: a"),
        ({"models": [{"name": "bad name!", "task": "embed", "source": "x"}]}, "name"),
        ({"models": [{"name": "a", "task": "embed", "source": "x", "max_batch_size": 0}]}, "max_batch_size"),
        ({"models": [{"name": "a", "task": "embed", "source": "x", "batch_size": 8}]}, "batch_size"),
        ({"models": [{"name": "a", "task": "dance", "source": "x"}]}, "task"),
    ],
)
def test_bad_config_is_rejected_naming_the_problem(args, words):
    with pytest.raises(ValidationError) as e:
        AppConfig.model_validate(args)
    assert words in str(e.value)


@pytest.mark.parametrize("path", [SERVE_CONFIG, SERVE_CONFIG.with_name("serve_config.gpu.yaml")])
def test_serve_config_validates_against_ray_schema_and_ours(path):
    raw = yaml.safe_load(path.read_text())
    deploy = ServeDeploySchema.model_validate(raw)
    assert deploy.http_options.host == "127.0.0.1"
    assert deploy.logging_config.enable_access_log is False
    (app,) = deploy.applications
    config = AppConfig.model_validate(app.args)
    # Every override in the file names a deployment the graph really has.
    graph_names = {"Ingress"} | {m.deployment_name for m in config.models} | {
        m.stage_name(k) for m in config.models for k in range(m.pipeline_stages)
    }
    assert {d.name for d in app.deployments} <= graph_names
    for d in app.deployments:
        if d.name != "Ingress" and not d.name.startswith("Stage"):
            model = next(m for m in config.models if m.deployment_name == d.name)
            assert d.max_ongoing_requests >= model.max_batch_size, "batch size unreachable"


def test_build_app_binds_ingress_over_one_deployment_per_model():
    app = build_app({"models": [ModelConfig(name="m1", task="embed", source="x").model_dump()]})
    assert app._bound_deployment.name == "Ingress"


def test_resolve_bundled_built_and_local(tmp_path):
    bundled = resolve_source(f"bundled:{MODEL}")
    assert (bundled / "model.safetensors").exists()
    assert (resolve_source("built:tiny-lm") / "model.safetensors").exists()
    assert resolve_source(str(tmp_path)) == tmp_path.resolve()


@pytest.mark.parametrize("source,words", [("bundled:nope", "no bundled model"), ("built:nope", "no built model"), ("./missing-dir", "no such directory")])
def test_unresolvable_sources_say_why(source, words):
    with pytest.raises(SourceError, match=words):
        resolve_source(source)


def test_hub_id_offline_says_why(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="neither a local directory nor a Hugging Face id"):
        resolve_source("rayinfer-test/definitely-not-cached")


def test_committed_dashboard_is_the_generators_output():
    from monitoring.build_dashboards import OUT, render

    assert OUT.read_text() == render(), "run `python -m monitoring.build_dashboards` and commit the JSON"
