"""The pipeline across two Ray nodes on one machine (ray.cluster_utils.Cluster): each stage on its
own node, and the same tokens as the unsplit model computed in-process."""

from __future__ import annotations

import os

import pytest
import ray
from ray import serve
from ray._common.test_utils import wait_for_condition
from ray.cluster_utils import Cluster
from ray.serve._private import api as serve_api
from ray.serve.schema import ServeDeploySchema

from deployments.types import GenerateJob
from models.causal_lm import CausalLM
from models.generation import Engine
from models.params import SamplingParams
from models.tiny_lm import ensure
from tests.harness import serve_env
from tests.helpers import free_port, serve_config_on

pytestmark = pytest.mark.slow
APP = "rayinfer"
PROMPTS = ["Serving models online", "The replica holds the model in memory", "A"]


def config_on_two_nodes() -> dict:
    """The shipped config, pipeline model only, Stage k pinned to node k by a custom resource."""
    config = serve_config_on(free_port())
    app = config["applications"][0]
    app["args"]["models"] = [m for m in app["args"]["models"] if m["name"] == "tiny-lm-pipeline"]
    app["deployments"] = [
        d for d in app["deployments"] if d["name"].endswith("tiny-lm-pipeline") or d["name"] == "Ingress"
    ]
    for d in app["deployments"]:
        if d["name"].startswith("Stage"):
            d["ray_actor_options"]["resources"] = {f"node{d['name'][5]}": 0.01}
    return config


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


def test_stages_on_two_nodes_give_the_unsplit_tokens(cluster):
    config = ServeDeploySchema.model_validate(config_on_two_nodes())
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
        serve.get_deployment_handle(f"Stage{k}-tiny-lm-pipeline", app_name=APP).info.remote().result()["node_id"]
        for k in range(2)
    ]
    assert nodes[0] != nodes[1], "the two stages share a node"

    generator = serve.get_deployment_handle("Generator-tiny-lm-pipeline", app_name=APP).options(stream=True)
    lm = CausalLM(ensure())
    for prompt in PROMPTS:
        params = SamplingParams(max_tokens=20, temperature=0)
        text = "".join(
            c.text for item in generator.generate.remote(GenerateJob(params, prompts=[prompt])) for c in item
        )
        engine = Engine(lm)
        engine.add("x", lm.encode(prompt), params)
        expected = ""
        while engine.has_work():
            expected += "".join(o.text for o in engine.step())
        assert text == expected, prompt
