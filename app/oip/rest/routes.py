"""The Open Inference Protocol's REST routes under /v2: thin adapters over app/oip/core.py."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.http.errors import error_responses
from app.http.routing import Registry
from app.oip import core as oip
from app.oip.rest import binary
from app.oip.rest.errors import error_body
from app.oip.rest.protocol import (
    InferRequestBody,
    InferResponseBody,
    ModelMetadataBody,
    OipError,
    ServerMetadataBody,
    metadata_body,
    request_from_body,
    response_body,
)

PREFIX = "/v2"
ERROR_BODY = error_body  # the body every error under PREFIX has, whoever answers it
# A JSON body without Content-Type is still JSON here: Triton reads it so, and tritonclient.http sends none.
router = APIRouter(prefix=PREFIX, strict_content_type=False)
NOT_READY = error_responses(OipError, only=(503,))
MODEL_ERRORS = error_responses(OipError, only=(401, 404, 500, 503))


@router.get("", response_model=ServerMetadataBody)
async def server_metadata() -> dict:
    """OIP server metadata: name, version, supported extensions."""
    meta = oip.server_metadata()
    return {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}


@router.get("/health/live")
async def live() -> dict:
    """OIP liveness: 200 while the server answers."""
    return {"live": True}


@router.get("/health/ready", responses=NOT_READY)
async def ready(registry: Registry) -> JSONResponse:
    """OIP readiness: 200 when every model is ready, else 503."""
    is_ready = await oip.server_ready(registry)
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/models/{name}", response_model=ModelMetadataBody, responses=MODEL_ERRORS)
async def model_metadata(name: str, registry: Registry) -> dict:
    """A model's inputs and outputs (names, datatypes, shapes; -1 is any size)."""
    return metadata_body(await oip.metadata(registry, name))


@router.get("/models/{name}/ready", responses=MODEL_ERRORS)
async def model_ready(name: str, registry: Registry) -> JSONResponse:
    """200 when the model is ready, 503 when not, 404 when not served."""
    is_ready = await oip.model_ready(registry, name)
    return JSONResponse({"name": name, "ready": is_ready}, status_code=200 if is_ready else 503)


@router.post("/models/{name}/infer", response_model=InferResponseBody, responses=error_responses(OipError))
async def infer(name: str, body: InferRequestBody, request: Request, registry: Registry) -> Response:
    """Run a model on JSON tensors (OIP's inference request and response); inputs and outputs may be
    raw bytes after the JSON, as Triton's binary tensor data extension sends them (app/oip/rest/binary.py)."""
    binary_outputs = binary.output_flags(body.parameters or {}, body.outputs)
    resp = await oip.infer(registry, request_from_body(name, body, request.scope.get(binary.SCOPE_KEY)))
    return binary.respond(response_body(resp), resp, *binary_outputs)
