"""What `make serve` does, end to end: `serve run serve_config.yaml` as a subprocess,
then the official `openai` client and a standard Open Inference Protocol gRPC client against it.
Runs in its own pytest process (see Makefile) because `serve run` starts its own Ray cluster.
"""

from __future__ import annotations

import subprocess

import grpc
import numpy as np
import openai
import pytest
import yaml

from app.oip.grpc import grpc_predict_v2_pb2 as pb
from app.oip.grpc import grpc_predict_v2_pb2_grpc
from tests.harness import ROOT, dashboard_of, free_port, serve_config_on, serve_run_process
from tests.helpers import MODEL, cosine

# A module's first test starts its cluster, a vLLM engine among it: minutes on a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def grpc_port():
    return free_port()


@pytest.fixture(scope="module")
def serve_run_proc(tmp_path_factory, grpc_port):
    config = serve_config_on(free_port(), grpc_port)
    with serve_run_process(config, log_dir=tmp_path_factory.mktemp("serve")) as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def served(serve_run_proc):
    return serve_run_proc[0]


def test_openai_client_embeddings_match_sentence_transformers(served, reference):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    texts = ["How do I serve a model online?", "Ray Serve scales replicas.", "bonjour"]
    result = client.embeddings.create(model=MODEL, input=texts)
    got = np.array([d.embedding for d in result.data])
    assert cosine(got, reference(texts)).min() >= 0.999
    assert [m.id for m in client.models.list()] == [MODEL, "SmolLM2-135M-Instruct"]  # the lean default


def test_openai_client_streams_a_completion(served):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    args = dict(model="SmolLM2-135M-Instruct", prompt="Serving models", max_tokens=12, temperature=0)
    whole = client.completions.create(**args)
    stream = client.completions.create(**args, stream=True)
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text


def test_the_readmes_chat_example_answers_in_sense(served):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    chat = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question, temperature=0)
    assert "Paris" in chat.choices[0].message.content and chat.choices[0].finish_reason == "stop"


def test_grpc_client_gets_the_openai_clients_vectors(served, grpc_port):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    texts = ["Ray Serve scales replicas.", "bonjour"]
    expected = np.array([d.embedding for d in client.embeddings.create(model=MODEL, input=texts).data])
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
        request = pb.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(
            t.encode() for t in texts
        )
        [out] = stub.ModelInfer(request, timeout=30).outputs
    got = np.array(out.contents.fp32_contents).reshape(list(out.shape))
    assert cosine(got, expected).min() >= 0.99999


def test_make_status_shows_every_deployment_after_make_serve(serve_run_proc):
    """`make status` from another shell, against the cluster `serve run` started (token auth on)."""
    dashboard = dashboard_of(serve_run_proc[1])
    done = subprocess.run(
        ["make", "-s", "status", f"DASHBOARD={dashboard}"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    app = yaml.safe_load(done.stdout)["applications"]["rayinfer"]
    shipped = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["deployments"]
    assert app["status"] == "RUNNING"
    assert {name: d["status"] for name, d in app["deployments"].items()} == dict.fromkeys(
        [d["name"] for d in shipped], "HEALTHY"
    )
    assert all(d["replica_states"] == {"RUNNING": 1} for d in app["deployments"].values())
