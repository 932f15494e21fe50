"""KubeRay manifests generated from the Serve configs: `python -m deploy.kuberay` writes
deploy/kuberay/rayservice.cpu.yaml (from serve_config.yaml), rayservice.gpu.yaml (from
serve_config.gpu.yaml, with a GPU worker group) and podmonitor.yaml. Edit the Serve configs or this
file, never the generated YAML (tests/unit/test_kuberay.py fails when they differ).

Each RayService carries its Serve config as `serveConfigV2`, with what Kubernetes needs instead of a
laptop: HTTP on 0.0.0.0 (the pod's address, reached through KubeRay's serve Service) and a proxy on
every node that has a replica, so every serving pod takes traffic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from app.environment import HAPROXY_WRAPPER, SERVE_ENV

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
RAY_VERSION = "2.60.0"  # pyproject.toml's ray[serve,data] pin (tests/unit/test_kuberay.py checks)
# Built by deploy/Dockerfile on rayproject/ray:<RAY_VERSION>-py311 (CPU) / -py311-gpu (CUDA).
IMAGE = {"cpu": f"rayinfer:0.1.0-ray{RAY_VERSION}-py311", "gpu": f"rayinfer:0.1.0-ray{RAY_VERSION}-py311-gpu"}
APP_LABELS = {"app.kubernetes.io/name": "rayinfer", "app.kubernetes.io/part-of": "rayinfer"}
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 9000, 8080
# Every Ray container runs rayinfer's supervisor around KubeRay's generated `ray start` (supervise/, README
# "Starting and stopping"): with this annotation on the RayService (KubeRay copies it to the RayCluster) KubeRay
# keeps the container's command and passes its own `ray start ...` in KUBERAY_GEN_RAY_START_CMD. On the pod's
# SIGTERM the supervisor stops the node within STOP_TIMEOUT_S, then kills what is left and checks it is gone;
# the pod's grace period leaves it GRACE_S in all, as the systemd unit's TimeoutStopSec does.
ANNOTATIONS = {"ray.io/overwrite-container-cmd": "true"}
COMMAND = ["python", "-m", "supervise", "node"]
STOP_TIMEOUT_S = 30
GRACE_S = STOP_TIMEOUT_S + 15
# The serving pods' readiness: the ingress answers through this pod's Serve proxy. Not /readyz: that is
# false while any one model is down, and would take every pod, and so every model, out of the Service.
READINESS = {
    "httpGet": {"path": "/healthz", "port": HTTP_PORT},
    "periodSeconds": 5,
    "timeoutSeconds": 3,
    "failureThreshold": 3,
}


@dataclass(frozen=True)
class Profile:
    name: str
    serve_config: str  # relative to the repository root
    cpu_workers: tuple[int, int]  # (min, max) CPU worker pods
    worker_cpu: str
    worker_memory: str
    gpu: bool = False


PROFILES = (
    Profile("cpu", "serve_config.yaml", (1, 4), worker_cpu="4", worker_memory="8Gi"),
    Profile("gpu", "serve_config.gpu.yaml", (1, 2), worker_cpu="4", worker_memory="16Gi", gpu=True),
)


class _Block(str):
    """A string YAML writes as a `|` block (serveConfigV2 reads as the YAML it holds)."""


class _Dumper(yaml.SafeDumper):
    """Writes shared values out in full, never as anchors and aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(_Block, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", str(v), style="|"))


def serve_config_v2(path: Path) -> dict:
    """The Serve config as the cluster runs it on Kubernetes."""
    config = yaml.safe_load(path.read_text())
    config["proxy_location"] = "EveryNode"
    config["http_options"] = {**config.get("http_options", {}), "host": "0.0.0.0", "port": HTTP_PORT}
    config["grpc_options"] = {**config.get("grpc_options", {}), "port": GRPC_PORT}
    return config


def gpus(config: dict) -> tuple[int, int, int]:
    """(GPUs per pod, fewest and most GPUs) the config's deployments ask for: per replica, its
    `ray_actor_options.num_gpus` plus its placement group bundles' GPUs, times its replicas (an
    autoscaled deployment's min and max)."""
    per_pod, low, high = 1, 0, 0
    for app in config["applications"]:
        for d in app.get("deployments", []):
            each = (d.get("ray_actor_options") or {}).get("num_gpus", 0)
            each += sum(b.get("GPU", 0) for b in d.get("placement_group_bundles") or [])
            if not each:
                continue
            scaling = d.get("autoscaling_config") or {}
            n = d.get("num_replicas", 1)
            low += each * scaling.get("min_replicas", n)
            high += each * scaling.get("max_replicas", n)
            per_pod = max(per_pod, math.ceil(each))
    return per_pod, math.ceil(low), math.ceil(high)


# Where `pip install` puts rayinfer's console scripts in the image (rayproject/ray's Python is Anaconda's).
IMAGE_BIN = "/home/ray/anaconda3/bin"


def _env() -> list[dict[str, str]]:
    """The serving environment (app/environment.py) every Ray node starts with (paths as in the image), and
    the supervisor's stop bound."""
    image = {"RAY_SERVE_HAPROXY_BINARY_PATH": f"{IMAGE_BIN}/{HAPROXY_WRAPPER.name}"}
    env = {**SERVE_ENV, **image, "RAYINFER_STOP_TIMEOUT_S": str(STOP_TIMEOUT_S)}
    return [{"name": k, "value": v} for k, v in env.items()]


def _ports(head: bool) -> list[dict[str, Any]]:
    ports = [{"name": "serve", "containerPort": HTTP_PORT}, {"name": "grpc", "containerPort": GRPC_PORT}]
    ports.append({"name": "metrics", "containerPort": METRICS_PORT})
    if head:
        ports += [
            {"name": "gcs-server", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
            {"name": "client", "containerPort": 10001},
        ]
    return ports


def _container(name: str, image: str, cpu: str, memory: str, gpus: int = 0, head: bool = False) -> dict:
    resources: dict[str, dict[str, Any]] = {"requests": {"cpu": cpu, "memory": memory}}
    resources["limits"] = {**resources["requests"], **({"nvidia.com/gpu": gpus} if gpus else {})}
    container: dict[str, Any] = {"name": name, "image": image, "command": COMMAND, "env": _env(), "ports": _ports(head)}
    container["resources"] = resources
    if not head:
        # The head gets KubeRay's own probes: KubeRay deploys Serve only once the head is ready, so
        # the head's readiness cannot wait for Serve. KubeRay also gives every pod its liveness
        # probe (the Ray node's health), as it does when none is set.
        container["readinessProbe"] = READINESS
    return container


def _pod(container: dict, component: str, gpu: bool = False) -> dict:
    spec: dict[str, Any] = {"containers": [container], "terminationGracePeriodSeconds": GRACE_S}
    if gpu:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": {**APP_LABELS, "app.kubernetes.io/component": component}}, "spec": spec}


def _worker_group(name: str, bounds: tuple[int, int], container: dict, gpu: bool = False) -> dict:
    return {
        "groupName": name,
        "replicas": bounds[0],
        "minReplicas": bounds[0],
        "maxReplicas": bounds[1],
        "rayStartParams": {},  # CPUs, GPUs and memory: KubeRay reads the container's limits
        "template": _pod(container, f"{name}-worker", gpu),
    }


def cluster(profile: Profile, config: dict) -> dict:
    """rayClusterConfig: a head that runs no replicas, CPU workers, and GPU workers for the GPU profile."""
    head = _container("ray-head", IMAGE["cpu"], "2", "8Gi", head=True)
    cpu = _container("ray-worker", IMAGE["cpu"], profile.worker_cpu, profile.worker_memory)
    groups = [_worker_group("cpu", profile.cpu_workers, cpu)]
    if profile.gpu:
        per_pod, low, high = gpus(config)
        gpu = _container("ray-worker", IMAGE["gpu"], profile.worker_cpu, profile.worker_memory, gpus=per_pod)
        groups.append(_worker_group("gpu", (math.ceil(low / per_pod), math.ceil(high / per_pod)), gpu, gpu=True))
    return {
        "rayVersion": RAY_VERSION,
        # Ray 2.60 clusters authenticate with a token: KubeRay makes it a Secret, gives it to every
        # pod and sends it with its own dashboard calls.
        "authOptions": {"mode": "token"},
        # Serve's autoscaling (autoscaling_config) asks the Ray autoscaler for pods within the groups' bounds.
        "enableInTreeAutoscaling": True,
        "headGroupSpec": {
            # No replicas on the head: it runs the GCS, the dashboard and Serve's controller.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod(head, "head"),
        },
        "workerGroupSpecs": groups,
    }


def rayservice(profile: Profile) -> dict:
    config = serve_config_v2(ROOT / profile.serve_config)
    name = "rayinfer" if profile.name == "cpu" else f"rayinfer-{profile.name}"
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": APP_LABELS, "annotations": ANNOTATIONS},
        "spec": {
            # A changed serveConfigV2 is applied in place, replica by replica (Serve's rolling update).
            # A changed rayClusterConfig (image, resources) starts a new cluster beside the old one and
            # moves the Service to it once its applications are RUNNING; the old one is deleted after
            # rayClusterDeletionDelaySeconds, time for its requests in flight to finish.
            "upgradeStrategy": {"type": "NewCluster"},
            "rayClusterDeletionDelaySeconds": 120,
            "serveConfigV2": _Block(yaml.safe_dump(config, sort_keys=False)),
            "serveService": _serve_service(name),
            "rayClusterConfig": cluster(profile, config),
        },
    }


def _serve_service(name: str) -> dict:
    """KubeRay's Service in front of the serving pods (selector set by KubeRay), HTTP and gRPC."""
    ports = [
        {"name": "serve", "port": HTTP_PORT, "targetPort": HTTP_PORT},
        {"name": "grpc", "port": GRPC_PORT, "targetPort": GRPC_PORT},
    ]
    return {"metadata": {"name": f"{name}-serve-svc", "labels": APP_LABELS}, "spec": {"ports": ports}}


def podmonitor() -> dict:
    """Prometheus Operator's PodMonitor: every Ray pod's metrics port (Ray's and Serve's metrics and
    rayinfer's own, README Metrics), with the RayCluster's name as a label."""
    relabel = {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"], "targetLabel": "ray_io_cluster"}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": "rayinfer", "labels": APP_LABELS},
        "spec": {
            "jobLabel": "app.kubernetes.io/name",
            "selector": {"matchLabels": {"app.kubernetes.io/name": "rayinfer", "ray.io/is-ray-node": "yes"}},
            "podMetricsEndpoints": [{"port": "metrics", "interval": "15s", "relabelings": [relabel]}],
        },
    }


HEADER = "# Generated by `python -m deploy.kuberay` from {source}: edit {source}, never this file.\n"


def manifests() -> dict[str, str]:
    """File name → YAML text of every generated manifest."""
    out = {
        f"rayservice.{p.name}.yaml": HEADER.format(source=f"{p.serve_config} and deploy/kuberay/__init__.py")
        + _dump(rayservice(p))
        for p in PROFILES
    }
    out["podmonitor.yaml"] = HEADER.format(source="deploy/kuberay/__init__.py") + _dump(podmonitor())
    return out


def _dump(manifest: dict) -> str:
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=120)


def main() -> None:
    for name, text in manifests().items():
        (OUT / name).write_text(text)
        print(OUT / name)
