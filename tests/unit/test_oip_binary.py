"""Triton's binary tensor data extension on /v2/models/{name}/infer (app/oip/rest/binary.py), through the
ingress's own HTTP app (app/ingress.py's make_api: middleware, routes, error bodies) over a stub
registry: no Ray. Bodies are framed as tritonclient.http frames them."""

from __future__ import annotations

import asyncio
import json
import struct

import httpx
import numpy as np
import pytest

from app.config import AppConfig, ModelConfig
from app.core.guard import InflightGate
from app.ingress import make_api
from app.oip.tensors import Tensor, to_raw
from deployments.types import EmbedResult

DIM = 3


class StubRegistry:
    """One embedding model `m` whose vector for a text is (len, first code point, index)."""

    def __init__(self, config: AppConfig):
        self.config = config
        self.cfg = ModelConfig(name="m", task="embed", source="bundled:all-MiniLM-L6-v2")

    def model(self, name, task):
        from app.core.errors import ModelNotFound

        if name != "m":
            raise ModelNotFound(f"The model `{name}` does not exist", "model")
        return self.cfg

    async def embed(self, name, job):
        vectors = [[len(t), ord(t[0]), i] for i, t in enumerate(job.texts)]
        return EmbedResult(np.array(vectors, dtype=np.float32), prompt_tokens=0)


def post(body, headers: dict[str, str] | None = None, max_bytes: int = 1 << 20) -> httpx.Response:
    config = AppConfig(max_request_bytes=max_bytes)
    app = make_api(config, StubRegistry(config), InflightGate(100, 1), ())  # type: ignore[arg-type]

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v2/models/m/infer", content=body, headers=headers or {})

    return asyncio.run(asyncio.wait_for(go(), timeout=10))


def framed(request: dict, binary: bytes) -> tuple[bytes, dict[str, str]]:
    """A JSON header and raw bytes, as tritonclient.http sends them."""
    header = json.dumps(request).encode()
    return header + binary, {"Inference-Header-Content-Length": str(len(header))}


def texts_raw(texts: list[str]) -> bytes:
    return to_raw(Tensor("text", "BYTES", (len(texts),), [t.encode() for t in texts]))


def binary_request(texts: list[str], size: int | None = None, **request) -> tuple[bytes, dict[str, str]]:
    raw = texts_raw(texts)
    tensor = {"name": "text", "shape": [len(texts)], "datatype": "BYTES"}
    tensor["parameters"] = {"binary_data_size": len(raw) if size is None else size}
    return framed({"inputs": [tensor], **request}, raw)


def parse(resp: httpx.Response) -> tuple[dict, dict[str, bytes]]:
    """(JSON header, raw bytes by output name), as tritonclient.http's InferResult reads them."""
    length = resp.headers.get("Inference-Header-Content-Length")
    if length is None:
        return resp.json(), {}
    header = json.loads(resp.content[: int(length)])
    at, raw = int(length), {}
    for out in header["outputs"]:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            raw[out["name"]] = resp.content[at : at + size]
            at += size
    assert at == len(resp.content)
    return header, raw


TEXTS = ["hello", "☕ time", "x"]
EXPECTED = [[5, ord("h"), 0], [6, ord("☕"), 1], [1, ord("x"), 2]]


def test_binary_inputs_and_binary_outputs_by_default_as_the_client_asks():
    body, headers = binary_request(TEXTS, id="r", parameters={"binary_data_output": True})
    resp = post(body, headers)
    assert resp.status_code == 200, resp.text
    header, raw = parse(resp)
    [out] = header["outputs"]
    assert (header["id"], out["name"], out["datatype"], out["shape"]) == ("r", "embedding", "FP32", [3, DIM])
    assert "data" not in out and out["parameters"] == {"binary_data_size": 3 * DIM * 4}
    assert np.frombuffer(raw["embedding"], "<f4").reshape(3, DIM).tolist() == EXPECTED


def test_binary_inputs_with_json_outputs_and_json_inputs_with_binary_outputs():
    body, headers = binary_request(TEXTS, outputs=[{"name": "embedding", "parameters": {"binary_data": False}}])
    header, raw = parse(post(body, headers))
    assert raw == {} and header["outputs"][0]["data"] == [x for row in EXPECTED for x in row]
    request = {
        "inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": TEXTS}],
        "outputs": [{"name": "embedding", "parameters": {"binary_data": True}}],
    }
    header, raw = parse(post(json.dumps(request).encode()))  # no Content-Type, as tritonclient.http sends JSON
    assert np.frombuffer(raw["embedding"], "<f4").reshape(3, DIM).tolist() == EXPECTED
    # An output's own choice wins over the request's default.
    request["parameters"] = {"binary_data_output": True}
    request["outputs"] = [{"name": "embedding", "parameters": {"binary_data": False}}]
    header, raw = parse(post(json.dumps(request).encode()))
    assert raw == {} and len(header["outputs"][0]["data"]) == 3 * DIM


def test_plain_json_is_unchanged():
    request = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}
    resp = post(json.dumps(request).encode(), {"content-type": "application/json"})
    assert resp.status_code == 200 and "Inference-Header-Content-Length" not in resp.headers
    assert resp.headers["content-type"] == "application/json"
    assert resp.json()["outputs"][0]["data"] == [5, ord("h"), 0]


def test_a_header_length_equal_to_the_body_is_plain_json():
    request = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}
    body, headers = framed(request, b"")
    assert post(body, headers).json()["outputs"][0]["data"] == [5, ord("h"), 0]


def bad(body: bytes, headers: dict[str, str] | None = None, **kwargs) -> str:
    """The 400's message; JSON bodies without Content-Type, as tritonclient.http sends them."""
    resp = post(body, headers, **kwargs)
    assert resp.status_code == 400, resp.text
    assert set(resp.json()) == {"error"}  # OIP's error body
    return resp.json()["error"]


def test_header_length_past_the_body_or_not_a_number():
    body, _ = binary_request(TEXTS)
    assert "is past the end of the" in bad(body, {"Inference-Header-Content-Length": str(len(body) + 1)})
    assert "Inference-Header-Content-Length: '-3' is not a non-negative integer" in bad(
        body, {"Inference-Header-Content-Length": "-3"}
    )
    # A header length that cuts the JSON: the route's JSON error, under OIP's body.
    assert "not valid JSON" in bad(body, {"Inference-Header-Content-Length": "10"})


@pytest.mark.parametrize(
    "size, extra, words",
    [
        (10_000, b"", "binary_data_size 10000 runs past the 26 bytes of binary data"),
        (None, b"\0\0", "28 bytes of binary data follow the JSON header (Inference-Header-Content-Length), but the"),
        (-1, b"", "binary_data_size must be a non-negative integer, got -1"),
        (True, b"", "binary_data_size must be a non-negative integer, got True"),
        ("26", b"", "binary_data_size must be a non-negative integer, got '26'"),
    ],
)
def test_sizes_that_do_not_add_up(size, extra, words):
    body, headers = binary_request(TEXTS, size=size)
    assert words in bad(body + extra, headers)


def test_binary_data_without_a_binary_input_or_a_binary_input_without_data():
    request = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    body, headers = framed(request, b"\x00\x00\x00\x00")
    assert "4 bytes of binary data follow the JSON header" in bad(body, headers)
    request = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}]}
    assert "binary_data_size 5 runs past the 0 bytes" in bad(json.dumps(request).encode())
    request = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]}
    assert "inputs[0] `text`: `data` is required" in bad(json.dumps(request).encode())


def test_both_data_and_binary_size():
    raw = texts_raw(["x"])
    tensor = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"], "parameters": {"binary_data_size": 5}}
    assert "has both `data` and parameters.binary_data_size" in bad(*framed({"inputs": [tensor]}, raw))


@pytest.mark.parametrize(
    "datatype, shape, raw, words",
    [
        ("FP32", [2], b"\x00" * 7, "7 raw bytes is not a whole number of FP32 elements"),
        ("INT64", [2], b"\x00" * 8, "1 elements for shape [2]"),
        ("BYTES", [1], struct.pack("<I", 9) + b"abc", "raw BYTES element of 9 bytes runs past"),
        ("BYTES", [2], texts_raw(["a"]), "1 elements for shape [2]"),
    ],
)
def test_element_sizes_that_do_not_fit_the_datatype(datatype, shape, raw, words):
    tensor = {"name": "text", "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": len(raw)}}
    message = bad(*framed({"inputs": [tensor]}, raw))
    assert message.startswith("inputs[0] `text`: ") and words in message


def test_binary_output_flags_must_be_booleans():
    request = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
    assert "parameters.binary_data_output: must be true or false" in bad(
        json.dumps({**request, "parameters": {"binary_data_output": "yes"}}).encode()
    )
    outputs = [{"name": "embedding", "parameters": {"binary_data": 1}}]
    assert "outputs[0].parameters.binary_data: must be true or false" in bad(
        json.dumps({**request, "outputs": outputs}).encode()
    )


@pytest.mark.parametrize("streamed", [False, True])
def test_the_body_limit_counts_the_binary_data(streamed):
    """By Content-Length, or (a streamed body without one) while the framing reads it."""
    body, headers = binary_request([t * 100 for t in TEXTS])  # over the smallest limit, 1 KiB

    async def chunks():
        for i in range(0, len(body), 16):
            yield body[i : i + 16]

    resp = post(chunks() if streamed else body, headers, max_bytes=len(body) - 1)
    assert resp.status_code == 413 and "max_request_bytes" in resp.json()["error"]
    assert post(chunks() if streamed else body, headers, max_bytes=len(body)).status_code == 200


def test_the_route_template_reaches_the_metrics_middleware():
    """The framing hands the route the same ASGI scope, so the metrics label the route, not `unmatched`."""
    from app.oip.rest.binary import BinaryTensorMiddleware

    seen = {}

    async def app(scope, receive, send):
        scope["route"] = "matched"  # what Starlette's router does, in place
        seen["body"] = (await receive())["body"]

    async def receive():
        return {"type": "http.request", "body": b'{"inputs": []}\x00\x01', "more_body": False}

    headers = [(b"inference-header-content-length", b"14")]
    scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer", "headers": headers}
    asyncio.run(BinaryTensorMiddleware(app, bodies=None)(scope, receive, None))  # type: ignore[arg-type]
    assert scope["route"] == "matched" and seen["body"] == b'{"inputs": []}'
    assert scope["rayinfer.binary_tensor_data"] == b"\x00\x01"
