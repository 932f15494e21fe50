"""NVIDIA's own Triton clients, `tritonclient.http` and `tritonclient.grpc`, with their default settings
against the session's service: health, metadata and inference as a Triton user calls them. Over HTTP
the defaults use Triton's binary tensor data extension (raw tensor bytes after the JSON, both ways);
`binary_data=False` sends and asks for JSON tensors. Vectors must equal /v1/embeddings' and texts
/v1/completions'."""

from __future__ import annotations

from urllib.parse import urlparse

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.helpers import MODEL

LM = "tiny-lm"
TEXTS = ["The cat sits outside", "A man is playing guitar", "naïve café ☕"]
PROMPTS = ["Serving models online is", "Ray Serve"]
INPUT = {MODEL: "text", LM: "text_input"}
SIGNATURES = {
    MODEL: ([("text", "BYTES", [-1])], [("embedding", "FP32", [-1, 384])]),
    LM: ([("text_input", "BYTES", [-1])], [("text_output", "BYTES", [-1]), ("finish_reason", "BYTES", [-1])]),
}


@pytest.fixture(scope="module")
def http_client(serve_url):
    client = httpclient.InferenceServerClient(url=urlparse(serve_url).netloc)  # "host:port", as Triton's docs
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(served):
    client = grpcclient.InferenceServerClient(url=served[1])
    yield client
    client.close()


def clients(http_client, grpc_client):
    return {"http": (http_client, httpclient), "grpc": (grpc_client, grpcclient)}


@pytest.mark.parametrize("wire", ["http", "grpc"])
def test_live_ready_and_server_metadata(http_client, grpc_client, wire):
    client, _ = clients(http_client, grpc_client)[wire]
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    name, extensions = (meta["name"], meta["extensions"]) if wire == "http" else (meta.name, meta.extensions)
    assert name == "rayinfer" and "binary_tensor_data" in extensions


@pytest.mark.parametrize("model", [MODEL, LM])
@pytest.mark.parametrize("wire", ["http", "grpc"])
def test_model_ready_and_metadata(http_client, grpc_client, wire, model):
    client, _ = clients(http_client, grpc_client)[wire]
    assert client.is_model_ready(model)
    meta = client.get_model_metadata(model)
    if wire == "http":
        got_in = [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]]
        got_out = [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]]
    else:
        got_in = [(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
        got_out = [(t.name, t.datatype, list(t.shape)) for t in meta.outputs]
    assert (got_in, got_out) == SIGNATURES[model]


def infer(wire, client, module, model: str, texts: list[str], binary: bool | None, outputs=(), **parameters):
    """`client.infer` as Triton's examples call it; binary None: the client's defaults throughout."""
    tensor = module.InferInput(INPUT[model], [len(texts)], "BYTES")
    data = np.array([t.encode() for t in texts], dtype=np.object_)
    if binary is None:
        tensor.set_data_from_numpy(data)
        requested = None
    else:
        tensor.set_data_from_numpy(data, **({"binary_data": binary} if wire == "http" else {}))
        kwargs = {"binary_data": binary} if wire == "http" else {}
        requested = [module.InferRequestedOutput(name, **kwargs) for name in outputs]
    return client.infer(model, [tensor], outputs=requested, parameters=parameters or None)


def texts_of(array) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else x for x in array.tolist()]


@pytest.mark.parametrize("binary", [None, False])
@pytest.mark.parametrize("wire", ["http", "grpc"])
def test_embeddings_equal_v1_embeddings(http, http_client, grpc_client, wire, binary):
    v1 = http.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS}).json()
    expected = np.array([d["embedding"] for d in v1["data"]], dtype=np.float32)
    client, module = clients(http_client, grpc_client)[wire]
    result = infer(wire, client, module, MODEL, TEXTS, binary, outputs=["embedding"])
    got = result.as_numpy("embedding")
    assert got.shape == (3, 384)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    if wire == "http":  # the response came in the form asked for
        out = result.get_output("embedding")
        assert ("binary_data_size" in (out.get("parameters") or {})) == (binary is None)


@pytest.mark.parametrize("binary", [None, False])
@pytest.mark.parametrize("wire", ["http", "grpc"])
def test_generation_equals_v1_completions_greedy(http, http_client, grpc_client, wire, binary):
    params = {"max_tokens": 16, "temperature": 0.0}
    v1 = http.post("/v1/completions", json={"model": LM, "prompt": PROMPTS, **params}).json()
    choices = sorted(v1["choices"], key=lambda c: c["index"])
    client, module = clients(http_client, grpc_client)[wire]
    result = infer(wire, client, module, LM, PROMPTS, binary, outputs=["text_output", "finish_reason"], **params)
    assert texts_of(result.as_numpy("text_output")) == [c["text"] for c in choices]
    assert texts_of(result.as_numpy("finish_reason")) == [c["finish_reason"] for c in choices]


def test_errors_reach_the_client_as_triton_exceptions(http_client, grpc_client):
    """A bad request is the client's InferenceServerException with the server's message, over both wires."""
    from tritonclient.utils import InferenceServerException

    for wire, (client, module) in clients(http_client, grpc_client).items():
        with pytest.raises(InferenceServerException, match="max_tokens"):
            infer(wire, client, module, LM, PROMPTS, None, max_tokens=-1)
        with pytest.raises(InferenceServerException, match="does not exist"):
            client.get_model_metadata("no-such-model")
