"""The Open Inference Protocol v2 against the real service: REST through plain HTTP (httpx), gRPC
through stubs generated from the standard `inference.GRPCInferenceService` proto. Results must
equal /v1/embeddings' vectors and /v1/completions' texts for the same inputs and parameters."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from ray import serve
from ray._common.test_utils import wait_for_condition

from app.oip.grpc import grpc_predict_v2_pb2 as pb
from app.oip.tensors import Tensor, to_raw
from tests.helpers import MODEL

LM = "SmolLM2-135M-Instruct"
APP = "rayinfer"
TEXTS = ["The cat sits outside", "A man is playing guitar", "naïve café ☕"]
PROMPTS = ["Serving models online is", "Ray Serve"]
INPUT = {MODEL: "text", LM: "text_input"}


def rest_body(model: str, texts: list[str], **parameters) -> dict:
    body = {"inputs": [{"name": INPUT[model], "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}
    if parameters:
        body["parameters"] = parameters
    return body


def parameter(value) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=value)


def grpc_request(model: str, texts: list[str], raw: bool = False, **parameters) -> pb.ModelInferRequest:
    """Typed `bytes_contents`, or raw length-prefixed contents as Triton's client sends them."""
    data = [t.encode() for t in texts]
    tensor = pb.ModelInferRequest.InferInputTensor(name=INPUT[model], datatype="BYTES", shape=[len(texts)])
    req = pb.ModelInferRequest(
        model_name=model, id="req-1", inputs=[tensor], parameters={k: parameter(v) for k, v in parameters.items()}
    )
    if raw:
        req.raw_input_contents.append(to_raw(Tensor("", "BYTES", (len(data),), data)))
    else:
        req.inputs[0].contents.bytes_contents.extend(data)
    return req


def output(resp: pb.ModelInferResponse, name: str):
    """An output tensor as numpy (FP32) or a list of str (BYTES), from raw or typed contents."""
    i, out = next((i, o) for i, o in enumerate(resp.outputs) if o.name == name)
    if resp.raw_output_contents:
        raw = resp.raw_output_contents[i]
        if out.datatype == "FP32":
            return np.frombuffer(raw, "<f4").reshape(list(out.shape))
        items, at = [], 0
        while at < len(raw):
            size = int.from_bytes(raw[at : at + 4], "little")
            items.append(raw[at + 4 : at + 4 + size].decode())
            at += 4 + size
        return items
    if out.datatype == "FP32":
        return np.array(out.contents.fp32_contents, dtype=np.float32).reshape(list(out.shape))
    return [b.decode() for b in out.contents.bytes_contents]


def rest_output(body: dict, name: str):
    out = next(o for o in body["outputs"] if o["name"] == name)
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"]) if out["datatype"] == "FP32" else out["data"]


@pytest.fixture(scope="module")
def generator(serve_url):
    return serve.get_deployment_handle(f"Generator-{LM}", app_name=APP)


def test_server_health_and_metadata(http, grpc_stub):
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").status_code == 200
    meta = http.get("/v2").json()
    assert meta["name"] == "rayinfer" and meta["version"] and "parameters" in meta["extensions"]
    assert grpc_stub.ServerLive(pb.ServerLiveRequest()).live
    assert grpc_stub.ServerReady(pb.ServerReadyRequest()).ready, http.get("/readyz").text  # why, if not
    grpc_meta = grpc_stub.ServerMetadata(pb.ServerMetadataRequest())
    assert (grpc_meta.name, grpc_meta.version, list(grpc_meta.extensions)) == (
        meta["name"],
        meta["version"],
        meta["extensions"],
    )


@pytest.mark.parametrize(
    "model, inputs, outputs",
    [
        (MODEL, [("text", "BYTES", [-1])], [("embedding", "FP32", [-1, 384])]),
        (LM, [("text_input", "BYTES", [-1])], [("text_output", "BYTES", [-1]), ("finish_reason", "BYTES", [-1])]),
    ],
)
def test_model_ready_and_metadata(http, grpc_stub, model, inputs, outputs):
    assert http.get(f"/v2/models/{model}/ready").json() == {"name": model, "ready": True}
    assert grpc_stub.ModelReady(pb.ModelReadyRequest(name=model)).ready, http.get("/readyz").text
    meta = http.get(f"/v2/models/{model}").json()
    assert meta["name"] == model and meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == inputs
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == outputs
    grpc_meta = grpc_stub.ModelMetadata(pb.ModelMetadataRequest(name=model))
    assert [(t.name, t.datatype, list(t.shape)) for t in grpc_meta.inputs] == inputs
    assert [(t.name, t.datatype, list(t.shape)) for t in grpc_meta.outputs] == outputs


def test_embeddings_equal_v1_embeddings_over_http_and_grpc(http, grpc_stub):
    v1 = http.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS}).json()
    expected = np.array([d["embedding"] for d in v1["data"]], dtype=np.float32)
    rest = http.post(f"/v2/models/{MODEL}/infer", json={**rest_body(MODEL, TEXTS), "id": "r1"})
    assert rest.status_code == 200, rest.text
    body = rest.json()
    assert (body["model_name"], body["id"]) == (MODEL, "r1")
    assert [(o["name"], o["datatype"], o["shape"]) for o in body["outputs"]] == [("embedding", "FP32", [3, 384])]
    typed = grpc_stub.ModelInfer(grpc_request(MODEL, TEXTS))
    raw = grpc_stub.ModelInfer(grpc_request(MODEL, TEXTS, raw=True))
    assert (typed.model_name, typed.id, list(typed.outputs[0].shape)) == (MODEL, "req-1", [3, 384])
    assert raw.raw_output_contents and not typed.raw_output_contents  # answered in the request's form
    for got in (rest_output(body, "embedding"), output(typed, "embedding"), output(raw, "embedding")):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "params", [{"max_tokens": 24, "temperature": 0.0}, {"max_tokens": 20, "temperature": 0.8, "top_p": 0.9, "seed": 7}]
)
def test_generation_equals_v1_completions_over_http_and_grpc(http, grpc_stub, params):
    v1 = http.post("/v1/completions", json={"model": LM, "prompt": PROMPTS, **params}).json()
    choices = sorted(v1["choices"], key=lambda c: c["index"])
    texts, finish = [c["text"] for c in choices], [c["finish_reason"] for c in choices]
    rest = http.post(f"/v2/models/{LM}/infer", json=rest_body(LM, PROMPTS, **params))
    assert rest.status_code == 200, rest.text
    assert rest_output(rest.json(), "text_output") == texts
    assert rest_output(rest.json(), "finish_reason") == finish
    for raw in (False, True):
        resp = grpc_stub.ModelInfer(grpc_request(LM, PROMPTS, raw=raw, **params))
        assert output(resp, "text_output") == texts and output(resp, "finish_reason") == finish


def test_stream_infer_concatenates_to_model_infer_and_survives_a_bad_request(grpc_stub):
    params = {"max_tokens": 40, "temperature": 0.0}
    whole = output(grpc_stub.ModelInfer(grpc_request(LM, PROMPTS, **params)), "text_output")
    bad = grpc_request(LM, PROMPTS, temperature=9.0)
    responses = list(
        grpc_stub.ModelStreamInfer(iter([grpc_request(LM, PROMPTS, **params), bad, grpc_request(MODEL, TEXTS)]))
    )
    first = [r for r in responses if r.infer_response.model_name == LM and not r.error_message]
    assert len(first) > 2, "generation streams in several responses"
    assert ["".join(p) for p in zip(*(output(r.infer_response, "text_output") for r in first))] == whole
    finals = [r.infer_response.parameters["triton_final_response"].bool_param for r in first]
    assert finals == [False] * (len(first) - 1) + [True]
    errors = [r for r in responses if r.error_message]
    assert len(errors) == 1 and "temperature" in errors[0].error_message
    assert output(responses[-1].infer_response, "embedding").shape == (3, 384)  # the stream went on


def test_requested_outputs_only(http, grpc_stub):
    body = {**rest_body(LM, ["hi"], max_tokens=3), "outputs": [{"name": "finish_reason"}]}
    assert [o["name"] for o in http.post(f"/v2/models/{LM}/infer", json=body).json()["outputs"]] == ["finish_reason"]
    req = grpc_request(LM, ["hi"], max_tokens=3)
    req.outputs.add(name="text_output")
    assert [o.name for o in grpc_stub.ModelInfer(req).outputs] == ["text_output"]


def _bad(model: str, **change) -> dict:
    tensor = {"name": INPUT[model], "shape": [2], "datatype": "BYTES", "data": ["a", "b"], **change}
    return {"inputs": [tensor]}


BAD = [
    pytest.param(MODEL, _bad(MODEL, datatype="FP32", data=[1.0, 2.0]), "BYTES", id="wrong-datatype"),
    pytest.param(MODEL, _bad(MODEL, shape=[2, 1]), "shape", id="wrong-shape"),
    pytest.param(MODEL, _bad(MODEL, shape=[3]), "3", id="data-length-not-shape"),
    pytest.param(MODEL, _bad(MODEL, name="texts"), "missing input `text`", id="missing-input"),
    pytest.param(MODEL, _bad(MODEL, datatype="STRING"), "datatype", id="unknown-datatype"),
    pytest.param(MODEL, _bad(MODEL, data=["a", ""]), "text", id="empty-text"),
    pytest.param(LM, {**_bad(LM), "parameters": {"temperature": 5}}, "temperature", id="bad-parameter"),
    pytest.param(LM, {**_bad(LM), "parameters": {"logprobs": 1}}, "logprobs", id="unknown-parameter"),
    pytest.param(LM, {**_bad(LM), "parameters": {"min_tokens": 9, "max_tokens": 3}}, "min_tokens", id="min-over-max"),
    pytest.param(LM, {**_bad(LM), "parameters": {"max_tokens": 2048}}, "2048", id="context-overflow"),
    pytest.param(LM, {**_bad(LM), "outputs": [{"name": "logits"}]}, "logits", id="unknown-output"),
]


@pytest.mark.parametrize("model, body, words", BAD)
def test_bad_tensors_are_invalid_argument_over_http_and_grpc(http, grpc_stub, model, body, words):
    r = http.post(f"/v2/models/{model}/infer", json=body)
    assert r.status_code == 400, r.text
    assert list(r.json()) == ["error"] and words in r.json()["error"]
    tensor = body["inputs"][0]
    req = pb.ModelInferRequest(
        model_name=model, parameters={k: parameter(v) for k, v in body.get("parameters", {}).items()}
    )
    t = req.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
    if tensor["datatype"] == "FP32":
        t.contents.fp32_contents.extend(tensor["data"])
    else:
        t.contents.bytes_contents.extend(d.encode() for d in tensor["data"])
    for o in body.get("outputs", []):
        req.outputs.add(name=o["name"])
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub.ModelInfer(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details()


def test_malformed_json_body_gets_oip_error(http):
    r = http.post(f"/v2/models/{MODEL}/infer", json={"inputs": "text"})
    assert r.status_code == 400 and list(r.json()) == ["error"] and "inputs" in r.json()["error"]


def test_unknown_model_is_not_found(http, grpc_stub):
    for r in (
        http.get("/v2/models/nope"),
        http.get("/v2/models/nope/ready"),
        http.post("/v2/models/nope/infer", json=_bad(MODEL)),
    ):
        assert r.status_code == 404 and "nope" in r.json()["error"]
    unknown = grpc_request(MODEL, TEXTS)
    unknown.model_name = "nope"
    calls = [
        lambda: grpc_stub.ModelInfer(unknown),
        lambda: grpc_stub.ModelMetadata(pb.ModelMetadataRequest(name="nope")),
        lambda: grpc_stub.ModelReady(pb.ModelReadyRequest(name="nope")),
        lambda: grpc_stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version="7")),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_model_repository_extension_is_unimplemented(grpc_stub):
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def expired_jobs(stats: dict[str, int]) -> int:
    return stats.get("expired_generate_queue", 0) + stats.get("expired_generate_running", 0)


def test_grpc_deadline_is_the_servers_answer_and_stops_the_generation(grpc_stub, generator):
    """The deadline comes as `x-request-timeout-seconds` metadata while the client itself would wait
    two minutes: the DEADLINE_EXCEEDED is the server's, and the Generator counts the job it stopped."""
    params = {"max_tokens": 480, "temperature": 0.7, "seed": 5, "ignore_eos": True}  # 480 tokens if let run
    before = generator.stats.remote().result()
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub.ModelInfer(
            grpc_request(LM, ["Serving models online is"], **params),
            metadata=(("x-request-timeout-seconds", "0.3"),),
            timeout=120,
        )
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
    assert "deadline" in e.value.details()
    # The server honoured the deadline: the job was stopped in the Generator (before or after its first
    # token), aborted in the engine, and its tokens stopped.
    wait_for_condition(lambda: generator.stats.remote().result()["unfinished"] == 0, timeout=10, retry_interval_ms=50)
    after = generator.stats.remote().result()
    assert expired_jobs(after) == expired_jobs(before) + 1, (before, after)
    assert after["tokens"] - before["tokens"] < 480, f"{after['tokens'] - before['tokens']} tokens past the deadline"


def test_grpcs_own_deadline_stops_the_generation(grpc_stub, generator):
    """A client's own gRPC deadline (`grpc-timeout`, what `timeout=` sends) without the metadata: Serve
    does not pass its time remaining on (app/oip/grpc/servicer.py `call_deadline`), but the call is
    cancelled when it passes, and with it the job in the Generator: its tokens stop."""
    params = {"max_tokens": 480, "temperature": 0.7, "seed": 6, "ignore_eos": True}  # 480 tokens if let run
    before = generator.stats.remote().result()
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub.ModelInfer(grpc_request(LM, ["Serving models online is"], **params), timeout=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
    wait_for_condition(lambda: generator.stats.remote().result()["unfinished"] == 0, timeout=30, retry_interval_ms=50)
    after = generator.stats.remote().result()
    assert after["tokens"] - before["tokens"] < 480, f"{after['tokens'] - before['tokens']} tokens past the deadline"
