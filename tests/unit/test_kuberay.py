"""The KubeRay manifests (deploy/kuberay/): committed as generated, valid against KubeRay's own CRD schema
(and Prometheus Operator's for the PodMonitor), vendored under tests/data/ with their versions, and no
field either schema does not name."""

from __future__ import annotations

import json
import os
import re

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from app.environment import SERVE_ENV
from deploy import kuberay
from supervise.__main__ import parse
from tests.helpers import ROOT

DATA = ROOT / "tests" / "data"
RAYSERVICE = json.loads((DATA / "kuberay" / "rayservice.v1.schema.json").read_text())
PODMONITOR = json.loads((DATA / "prometheus-operator" / "podmonitor.v1.schema.json").read_text())
# Kubernetes' ObjectMeta is not in a CRD's schema (the API server checks it): the fields used here.
OBJECT_META = {"name", "namespace", "labels", "annotations"}


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Every key of `value` that `schema` does not name, walking the tree. Open maps (additionalProperties)
    and `x-kubernetes-preserve-unknown-fields` take any key; `anyOf` branches are tried in turn."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if "anyOf" in schema:
        found = [unknown_fields(value, s, path) for s in schema["anyOf"]]
        return min(found, key=len)
    if isinstance(value, list):
        return [u for i, v in enumerate(value) for u in unknown_fields(v, schema.get("items", {}), f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    props, extra = schema.get("properties"), schema.get("additionalProperties")
    out = []
    for key, v in value.items():
        where = f"{path}.{key}" if path else key
        if props is not None and key in props:
            out += unknown_fields(v, props[key], where)
        elif isinstance(extra, dict):
            out += unknown_fields(v, extra, where)
        elif props is not None or extra is False:
            out.append(where)
        elif path == "metadata" or path.endswith(".metadata"):
            out += [] if key in OBJECT_META else [where]
    return out


def problems(manifest: dict, schema: dict) -> list[str]:
    """JSON-schema errors and unknown fields; empty when KubeRay (or Prometheus Operator) would take it."""
    found = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(manifest)
    ]
    found += [f"{f}: not a field of the schema" for f in unknown_fields(manifest, schema)]
    found += [f"metadata.{k}: not an ObjectMeta field used here" for k in manifest["metadata"] if k not in OBJECT_META]
    return found


def generated() -> dict[str, dict]:
    return {name: yaml.safe_load(text) for name, text in kuberay.manifests().items()}


def test_committed_manifests_are_what_the_generator_writes():
    for name, text in kuberay.manifests().items():
        path = ROOT / "deploy" / "kuberay" / name
        assert path.read_text() == text, f"{path} is stale: run `python -m deploy.kuberay`"


@pytest.mark.parametrize("name", ["rayservice.cpu.yaml", "rayservice.gpu.yaml"])
def test_rayservices_validate_against_kuberays_crd(name):
    manifest = generated()[name]
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    assert problems(manifest, RAYSERVICE) == []


def test_podmonitor_validates_against_prometheus_operators_crd_and_selects_every_ray_pod():
    monitor = generated()["podmonitor.yaml"]
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert problems(monitor, PODMONITOR) == []
    wanted = monitor["spec"]["selector"]["matchLabels"]
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    for template, container in pods(generated()["rayservice.gpu.yaml"]):
        ours = {k: v for k, v in wanted.items() if not k.startswith("ray.io/")}  # KubeRay adds ray.io/*
        assert ours.items() <= template["metadata"]["labels"].items()
        assert port in {p["name"] for p in container["ports"]}


@pytest.mark.parametrize(
    "path, value",
    [
        (["spec", "upgradeStrategey"], {"type": "NewCluster"}),  # misspelt
        (["spec", "rayClusterConfig", "headGroupSpec", "rayStartParam"], {}),
        (
            ["spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "readynessProbe"],
            {},
        ),
        (["spec", "rayClusterConfig", "workerGroupSpecs", 0, "replicas"], "one"),  # wrong type
        (["metadata", "lables"], {}),
    ],
)
def test_a_field_kuberay_does_not_know_fails(path, value):
    manifest = generated()["rayservice.cpu.yaml"]
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert problems(manifest, RAYSERVICE) != []


def pods(manifest: dict) -> list[tuple[dict, dict]]:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [(g["template"], c) for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("profile", kuberay.PROFILES, ids=lambda p: p.name)
def test_each_rayservice_serves_its_serve_config_on_the_pinned_ray(profile):
    manifest = generated()[f"rayservice.{profile.name}.yaml"]
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # what KubeRay hands the dashboard
    source = yaml.safe_load((ROOT / profile.serve_config).read_text())
    assert serve_config["applications"] == source["applications"]
    assert (serve_config["http_options"]["host"], serve_config["proxy_location"]) == ("0.0.0.0", "EveryNode")
    pin = re.search(r'"ray\[serve(?:,data)?\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text())[1]
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == kuberay.RAY_VERSION == pin
    assert manifest["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    for template, container in pods(manifest):
        assert f"ray{pin}-py311" in container["image"]
        env = {e["name"]: e["value"] for e in container["env"]}
        # Every node has the serving environment, with the HAProxy wrapper where the image installs it.
        wrapper = env.pop("RAY_SERVE_HAPROXY_BINARY_PATH")
        assert wrapper == f"{kuberay.IMAGE_BIN}/rayinfer-haproxy" and os.path.isabs(wrapper)
        assert env.items() >= {k: v for k, v in SERVE_ENV.items() if k != "RAY_SERVE_HAPROXY_BINARY_PATH"}.items()
        if template["metadata"]["labels"]["app.kubernetes.io/component"] != "head":
            assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 8000}


@pytest.mark.parametrize("profile", kuberay.PROFILES, ids=lambda p: p.name)
def test_every_ray_container_runs_the_supervisor_around_kuberays_ray_start(profile):
    manifest = generated()[f"rayservice.{profile.name}.yaml"]
    # Without the annotation KubeRay would replace the command with its own `ray start`.
    assert manifest["metadata"]["annotations"] == {"ray.io/overwrite-container-cmd": "true"}
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    for template, container in pods(manifest):
        assert container["command"] == ["python", "-m", "supervise", "node"]
        assert f"CMD {json.dumps(container['command'])}" in dockerfile  # `docker run` gets the same
        assert parse(container["command"][3:]).mode == "node"
        env = {e["name"]: e["value"] for e in container["env"]}
        # The pod's grace period covers the supervisor's drain and the kill after it.
        assert float(env["RAYINFER_STOP_TIMEOUT_S"]) + 10 <= template["spec"]["terminationGracePeriodSeconds"]


def test_the_gpu_profile_has_a_gpu_worker_group_for_every_gpu_replica():
    manifest = generated()["rayservice.gpu.yaml"]
    [gpu] = [g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    [container] = gpu["template"]["spec"]["containers"]
    per_pod, low, high = kuberay.gpus(yaml.safe_load((ROOT / "serve_config.gpu.yaml").read_text()))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == per_pod and container["image"].endswith("-gpu")
    assert gpu["minReplicas"] * per_pod >= low and gpu["maxReplicas"] * per_pod >= high
    cpu_only = generated()["rayservice.cpu.yaml"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in cpu_only] == ["cpu"]


def test_gpus_are_counted_per_replica_and_autoscaling_bounds():
    config = {
        "applications": [
            {
                "deployments": [
                    {"name": "A", "num_replicas": 2, "ray_actor_options": {"num_gpus": 1}},
                    {
                        "name": "B",
                        "autoscaling_config": {"min_replicas": 1, "max_replicas": 3},
                        "ray_actor_options": {"num_gpus": 2},
                    },
                    {"name": "C", "placement_group_bundles": [{"CPU": 1, "GPU": 1}, {"GPU": 1}]},
                    {"name": "Ingress", "ray_actor_options": {"num_cpus": 1}},
                ]
            }
        ]
    }
    assert kuberay.gpus(config) == (2, 2 + 2 + 2, 2 + 6 + 2)


def test_vendored_schemas_say_where_they_come_from():
    for folder in ("kuberay", "prometheus-operator"):
        text = (DATA / folder / "README.md").read_text()
        assert re.search(r"v\d+\.\d+\.\d+", text) and "openAPIV3Schema" in text
