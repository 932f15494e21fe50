"""The encoder pipeline across two Ray nodes on one machine (ray.cluster_utils.Cluster): each stage on its
own node, and the same vectors as the unsplit model (sentence-transformers on the same checkpoint)."""

from __future__ import annotations

import os

import httpx
import numpy as np
import pytest
import ray
from ray import serve
from ray._common.test_utils import wait_for_condition
from ray.cluster_utils import Cluster
from ray.serve._private import api as serve_api
from ray.serve.schema import ServeDeploySchema

from tests.harness import serve_env, with_pipelines
from tests.helpers import free_port, serve_config_on

pytestmark = pytest.mark.slow
APP = "rayinfer"
PIPELINE = "all-MiniLM-L6-v2-pipeline"
TEXTS = ["Serving models online", "The replica holds the model in memory", "A"]


def config_on_two_nodes() -> tuple[dict, int]:
    """The shipped configs, the encoder pipeline only, Stage k pinned to node k by a custom resource."""
    port = free_port()
    config = with_pipelines(serve_config_on(port))
    app = config["applications"][0]
    app["args"]["models"] = [m for m in app["args"]["models"] if m["name"] == PIPELINE]
    app["deployments"] = [d for d in app["deployments"] if d["name"].endswith(PIPELINE) or d["name"] == "Ingress"]
    for d in app["deployments"]:
        if d["name"].startswith("Stage"):
            d["ray_actor_options"]["resources"] = {f"node{d['name'][5]}": 0.01}
    return config, port


@pytest.fixture(scope="module")
def cluster():
    os.environ.update(serve_env())
    c = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"node0": 1}, "dashboard_port": free_port()}
    )
    c.add_node(num_cpus=1, resources={"node1": 1})
    ray.init(address=c.address)
    yield c
    serve.shutdown()
    ray.shutdown()
    c.shutdown()


def test_stages_on_two_nodes_give_the_unsplit_vectors(cluster, reference):
    raw, port = config_on_two_nodes()
    config = ServeDeploySchema.model_validate(raw)
    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(),
        grpc_options=config.grpc_options.model_dump(),
        proxy_location="HeadOnly",
    )
    client.deploy_apps(config, _blocking=False)
    wait_for_condition(
        lambda: getattr(serve.status().applications.get(APP), "status", None) == "RUNNING",
        timeout=240,
        retry_interval_ms=500,
    )

    nodes = [
        serve.get_deployment_handle(f"Stage{k}-{PIPELINE}", app_name=APP).info.remote().result()["node_id"]
        for k in range(2)
    ]
    assert nodes[0] != nodes[1], "the two stages share a node"
    r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"model": PIPELINE, "input": TEXTS}, timeout=60)
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])])
    np.testing.assert_allclose(got, reference(TEXTS), atol=1e-5)
