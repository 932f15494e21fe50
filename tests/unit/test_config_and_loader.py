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
    assert (generate.name, generate.task, generate.source) == (
        "SmolLM2-135M-Instruct",
        "generate",
        "built:smollm2-135m-instruct",
    )
    assert (embed.deployment_name, generate.deployment_name) == (f"Embedder-{MODEL}", "Generator-SmolLM2-135M-Instruct")


@pytest.mark.parametrize(
    "args,words",
    [
        ({"models": []}, "at least 1"),
        ({"models": [{"name": "a", "task": "embed", "source": "x"}] * 2}, "repeated: a"),
        ({"models": [{"name": "bad name!", "task": "embed", "source": "x"}]}, "name"),
        ({"models": [{"name": "a", "task": "embed", "source": "x", "max_batch_size": 0}]}, "max_batch_size"),
        ({"models": [{"name": "a", "task": "embed", "source": "x", "batch_size": 8}]}, "batch_size"),
        ({"models": [{"name": "a", "task": "dance", "source": "x"}]}, "task"),
        (
            {
                "models": [
                    {"name": "a", "task": "embed", "source": "x", "pipeline_stages": 2, "pipeline_boundaries": [1, 2]}
                ]
            },
            "pipeline_boundaries needs 1 layer indices",
        ),
        (
            {"models": [{"name": "a", "task": "embed", "source": "x", "pipeline_microbatches": 2}]},
            "pipeline_microbatches needs pipeline_stages > 1",
        ),
        (
            {
                "models": [
                    {"name": "a", "task": "generate", "source": "x", "pipeline_stages": 2, "pipeline_microbatches": 0}
                ]
            },
            "pipeline_microbatches",
        ),
    ],
)
def test_bad_config_is_rejected_naming_the_problem(args, words):
    with pytest.raises(ValidationError) as e:
        AppConfig.model_validate(args)
    assert words in str(e.value)


@pytest.mark.parametrize(
    "path", [SERVE_CONFIG, *(SERVE_CONFIG.with_name(f"serve_config.{p}.yaml") for p in ("pipeline", "gpu"))]
)
def test_serve_config_validates_against_ray_schema_and_ours(path):
    raw = yaml.safe_load(path.read_text())
    deploy = ServeDeploySchema.model_validate(raw)
    assert deploy.http_options.host == "127.0.0.1"
    assert deploy.logging_config.enable_access_log is False
    (app,) = deploy.applications
    config = AppConfig.model_validate(app.args)
    # Every override in the file names a deployment the graph really has.
    graph_names = (
        {"Ingress"}
        | {m.deployment_name for m in config.models}
        | {m.stage_name(k) for m in config.models if m.task == "embed" for k in range(m.pipeline_stages)}
    )
    assert {d.name for d in app.deployments} <= graph_names
    for d in app.deployments:
        if d.name != "Ingress" and not d.name.startswith("Stage"):
            model = next(m for m in config.models if m.deployment_name == d.name)
            assert d.max_ongoing_requests >= model.max_batch_size, "batch size unreachable"
            if model.task == "embed":  # a pipeline's batches in flight at once must all be able to fill
                assert d.max_ongoing_requests >= model.max_batch_size * model.microbatches, d.name


def test_build_app_binds_ingress_over_one_deployment_per_model():
    app = build_app({"models": [ModelConfig(name="m1", task="embed", source="x").model_dump()]})
    assert app._bound_deployment.name == "Ingress"


def test_an_encoder_splits_into_stages_and_microbatches_default_to_the_stage_count():
    embed = ModelConfig(name="e", task="embed", source=f"bundled:{MODEL}", pipeline_stages=3)
    two = ModelConfig(name="g", task="embed", source="x", pipeline_stages=2, pipeline_microbatches=1)
    assert (embed.microbatches, two.microbatches, ModelConfig(name="w", task="embed", source="x").microbatches) == (
        3,
        1,
        1,
    )
    app = build_app({"models": [embed.model_dump()]})
    embedder = app._bound_deployment.init_args[1]["e"]
    stages = embedder._bound_deployment.init_args[1]
    assert [s._bound_deployment.name for s in stages] == ["Stage0-e", "Stage1-e", "Stage2-e"]
    assert [s._bound_deployment.init_args[1:] for s in stages] == [(0, 0, 1), (1, 1, 2), (2, 2, 6)]  # balanced by bytes


@pytest.mark.parametrize(
    "extra,words",
    [
        ({"pipeline_stages": 7}, "'e': pipeline_stages: stages must be between 1 and the number of layers (6)"),
        ({"pipeline_stages": 2, "pipeline_boundaries": [6]}, "'e': pipeline_boundaries:"),
    ],
)
def test_a_split_the_model_cannot_take_is_refused_naming_the_field(extra, words):
    with pytest.raises(ValueError) as e:
        build_app({"models": [{"name": "e", "task": "embed", "source": f"bundled:{MODEL}", **extra}]})
    assert words in str(e.value)


def test_resolve_bundled_built_and_local(tmp_path):
    bundled = resolve_source(f"bundled:{MODEL}")
    assert (bundled / "model.safetensors").exists()
    assert (resolve_source("built:smollm2-135m-instruct") / "model.safetensors").exists()
    assert resolve_source(str(tmp_path)) == tmp_path.resolve()


@pytest.mark.parametrize(
    "source,words",
    [("bundled:nope", "no bundled model"), ("built:nope", "no built model"), ("./missing-dir", "no such directory")],
)
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
