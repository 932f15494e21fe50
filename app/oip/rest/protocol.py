"""REST side of the Open Inference Protocol (JSON tensors): wire schemas and the thin conversion
to and from the core records in `app/oip/core.py`. Every error under /v2 has OIP's body,
`{"error": "..."}`, with the status of the one error table."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from app.core.errors import InvalidInput
from app.oip import core as oip
from app.oip.rest.binary import REQUEST_FLAG, SIZE, binary_inputs
from app.oip.tensors import Tensor, flatten, from_elements, to_elements


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr
    shape: list[StrictInt] = Field(max_length=32)
    datatype: StrictStr
    parameters: dict[str, Any] | None = Field(
        None,
        description="`binary_data_size`: the tensor's bytes follow the JSON (Triton's binary tensor data "
        "extension) instead of `data`. Others are accepted and ignored (e.g. `content_type`).",
    )
    data: list[Any] | None = Field(
        None, description="Elements, flat or nested, row-major; BYTES elements as strings. Required unless binary."
    )


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data`: true for this output's bytes after the JSON header. Others are ignored."
    )


class InferRequestBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: StrictStr | None = Field(None, description="Echoed in the response.")
    parameters: dict[str, Any] | None = Field(
        None,
        description="Generation models: max_tokens, temperature, top_p, seed, stop. Any model: "
        "`binary_data_output` (every output as bytes after the JSON header, Triton's binary tensor data extension).",
    )
    inputs: list[RequestInput] = Field(min_length=1, max_length=64)
    outputs: list[RequestOutput] | None = Field(None, description="Outputs to return; all when absent.")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_size` for a binary output.")
    data: list[Any] | None = Field(None, description="Absent for a binary output.")


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str
    id: str
    parameters: dict[str, Any] = {}
    outputs: list[ResponseOutput]


class TensorMetadataBody(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadataBody(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadataBody]
    outputs: list[TensorMetadataBody]


class ServerMetadataBody(BaseModel):
    name: str
    version: str
    extensions: list[str]


class OipError(BaseModel):
    error: str


def request_from_body(model: str, body: InferRequestBody, binary: bytes | None = None) -> oip.InferRequest:
    """The core's request; `binary`: the bytes after the JSON header (Triton's binary tensor data
    extension, app/oip/rest/binary.py), None when the body was JSON alone."""
    raw = binary_inputs(body.inputs, binary or b"") if binary is not None or _any_binary(body) else {}
    inputs = [raw[i] if i in raw else _from_json(i, t) for i, t in enumerate(body.inputs)]
    parameters = dict(body.parameters or {})
    parameters.pop(REQUEST_FLAG, None)  # the HTTP framing's, not the model's
    return oip.InferRequest(
        model=model,
        id=body.id or "",
        inputs=inputs,
        parameters=parameters,
        outputs=[o.name for o in body.outputs] if body.outputs else None,
    )


def _any_binary(body: InferRequestBody) -> bool:
    return any(t.parameters and SIZE in t.parameters for t in body.inputs)


def _from_json(i: int, t: RequestInput) -> Tensor:
    field = f"inputs[{i}] `{t.name}`"
    if t.data is None:
        raise InvalidInput(f"{field}: `data` is required (or parameters.{SIZE} with binary data)", field)
    return from_elements(t.name, t.datatype, t.shape, flatten(t.data), field)


def response_body(resp: oip.InferResponse) -> dict:
    body: dict[str, Any] = {"model_name": resp.model, "model_version": oip.VERSION, "id": resp.id}
    if resp.parameters:
        body["parameters"] = resp.parameters
    body["outputs"] = [
        {"name": t.name, "shape": list(t.shape), "datatype": t.datatype, "data": to_elements(t)} for t in resp.outputs
    ]
    return body


def metadata_body(meta: oip.ModelMetadata) -> dict:
    def specs(items: tuple[oip.TensorSpec, ...]) -> list[dict]:
        return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in items]

    return {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": specs(meta.inputs),
        "outputs": specs(meta.outputs),
    }
