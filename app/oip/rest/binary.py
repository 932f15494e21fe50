"""Triton's binary tensor data extension over HTTP: the framing of `/v2/models/{name}/infer` bodies.

A request may carry tensors as raw bytes after its JSON: the header `Inference-Header-Content-Length`
gives the JSON's length in bytes, and each input sent that way has `parameters.binary_data_size`
instead of `data`; their bytes follow the JSON in the order of the inputs (BYTES elements as a
4-byte little-endian length and the element, every other datatype packed little-endian, the
tensor codec of `app/oip/tensors.py`). A response carries an output as raw bytes when the request
asks (`outputs[].parameters.binary_data: true`, or the request parameter `binary_data_output: true`
for every output not saying otherwise): the answer is then a JSON header whose length is in
`Inference-Header-Content-Length`, each binary output with `parameters.binary_data_size`, followed
by the outputs' bytes in order. Without either, bodies are plain JSON, as before. This is what
NVIDIA's `tritonclient.http` sends and parses with its default settings.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import orjson
from fastapi.responses import Response

from app.core.errors import InvalidInput, RayInferError
from app.http.errors import ErrorBodies, app_path
from app.http.responses import FastJSONResponse
from app.oip.core import InferResponse
from app.oip.tensors import Tensor, from_raw, to_raw

HEADER = "Inference-Header-Content-Length"
_HEADER_KEY = HEADER.lower().encode()
SCOPE_KEY = "rayinfer.binary_tensor_data"  # the bytes after the JSON header, for the route
SIZE = "binary_data_size"  # an input's or output's parameter: its raw bytes' length
OUTPUT_FLAG = "binary_data"  # a requested output's parameter
REQUEST_FLAG = "binary_data_output"  # the request parameter: every output binary unless it says otherwise


class BinaryTensorMiddleware:
    """Splits a binary-extension request on `POST /v2/models/{name}/infer`: the route parses the JSON
    header as its body, as any JSON request, and finds the bytes after it in `scope[SCOPE_KEY]`.
    Requests without `Inference-Header-Content-Length` pass through untouched."""

    def __init__(self, app: Callable, bodies: ErrorBodies):
        self.app, self.bodies = app, bodies

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable, send: Callable) -> None:
        # Cheapest tests first: every other request passes after a string comparison or two.
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/infer"):
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == _HEADER_KEY), None)
        path = app_path(scope)
        if length is None or not path.startswith("/v2/models/"):
            return await self.app(scope, receive, send)
        try:  # the body limit's 413 too: raised while reading, outside the routes' error handlers
            json_part, binary = split(await _read(receive), length.decode("latin-1"))
        except RayInferError as exc:
            return await self.bodies.response(exc, path)(scope, receive, send)
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(json_part)).encode())]
        # In place, not a copy: the routing writes the matched route into this scope, where the metrics
        # middleware outside reads it.
        scope["headers"], scope[SCOPE_KEY] = headers, binary
        sent = False

        async def json_only() -> dict:
            nonlocal sent
            if sent:  # after the body, what the client does next (a disconnect)
                return await receive()
            sent = True
            return {"type": "http.request", "body": json_part, "more_body": False}

        await self.app(scope, json_only, send)


async def _read(receive: Callable) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def split(body: bytes, header_length: str) -> tuple[bytes, bytes]:
    """(the JSON header, the binary data after it), or InvalidInput naming the header."""
    if not header_length.strip().isdigit():
        raise InvalidInput(f"{HEADER}: {header_length!r} is not a non-negative integer", HEADER)
    n = int(header_length)
    if n > len(body):
        raise InvalidInput(f"{HEADER}: {n} is past the end of the {len(body)}-byte body", HEADER)
    return body[:n], body[n:]


def binary_inputs(inputs: list[Any], binary: bytes) -> dict[int, Tensor]:
    """The tensors of the inputs sent as binary data (by index), cut from `binary` in order.

    `inputs` are the request's inputs (name, shape, datatype, parameters); the sizes must add up to
    exactly the bytes after the JSON header."""
    tensors: dict[int, Tensor] = {}
    at = 0
    for i, t in enumerate(inputs):
        field = f"inputs[{i}] `{t.name}`"
        size = (t.parameters or {}).get(SIZE)
        if size is None:
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"{field}: parameters.{SIZE} must be a non-negative integer, got {size!r}", field)
        if t.data is not None:
            raise InvalidInput(f"{field}: has both `data` and parameters.{SIZE}; send one", field)
        if at + size > len(binary):
            raise InvalidInput(
                f"{field}: parameters.{SIZE} {size} runs past the {len(binary)} bytes of binary data "
                f"after the JSON header ({at} taken by the inputs before it)",
                field,
            )
        tensors[i] = from_raw(t.name, t.datatype, t.shape, binary[at : at + size], field)
        at += size
    if at != len(binary):
        raise InvalidInput(
            f"{len(binary)} bytes of binary data follow the JSON header ({HEADER}), but the inputs' "
            f"parameters.{SIZE} add up to {at}",
            HEADER,
        )
    return tensors


def output_flags(parameters: dict[str, Any], outputs: list[Any] | None) -> tuple[bool, dict[str, bool]]:
    """(the default for every output, each requested output's own choice) of binary outputs."""
    default = parameters.get(REQUEST_FLAG, False)
    if not isinstance(default, bool):
        raise InvalidInput(f"parameters.{REQUEST_FLAG}: must be true or false, got {default!r}", REQUEST_FLAG)
    own = {}
    for i, o in enumerate(outputs or ()):
        flag = (o.parameters or {}).get(OUTPUT_FLAG)
        if flag is None:
            continue
        if not isinstance(flag, bool):
            field = f"outputs[{i}].parameters.{OUTPUT_FLAG}"
            raise InvalidInput(f"{field}: must be true or false, got {flag!r}", field)
        own[o.name] = flag
    return default, own


def respond(body: dict, resp: InferResponse, default: bool, own: dict[str, bool]) -> Response:
    """The JSON response `body` as is, or, when some output is to be binary, its JSON header with
    those outputs' `data` replaced by `parameters.binary_data_size`, followed by their bytes."""
    if not any(own.get(t.name, default) for t in resp.outputs):
        return FastJSONResponse(body)
    raw: list[bytes] = []
    for out, tensor in zip(body["outputs"], resp.outputs):
        if own.get(tensor.name, default):
            raw.append(to_raw(tensor))
            del out["data"]
            out["parameters"] = {**out.get("parameters", {}), SIZE: len(raw[-1])}
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(header + b"".join(raw), media_type="application/octet-stream", headers={HEADER: str(len(header))})
