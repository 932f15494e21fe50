"""gRPC side of the Open Inference Protocol: `inference.GRPCInferenceService` as methods of the
ingress deployment, a thin adapter between the protobuf messages and the core in `app/oip/core.py`.

Ray Serve's gRPC proxy (or, under HAProxy, the ingress replica's own gRPC server) calls the
deployment method named like the RPC. Errors answer with the gRPC code of the one error table
(`app/core/errors.py`), set on the call's context as Serve documents, with an empty message. A
client's deadline cancels the call, and with it the model's work (the registry's streams cancel
their handle call when left early).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from app.core import deadline, metrics
from app.core.errors import INTERNAL, ErrorKind, InvalidInput, Overloaded, RayInferError, Unauthorized, kind_of
from app.core.guard import InflightGate, key_matches
from app.core.registry import ModelRegistry, as_rayinfer_error
from app.oip import core as oip
from app.oip.grpc import grpc_predict_v2_pb2 as pb
from app.oip.tensors import Tensor, from_elements, from_raw, to_raw

logger = logging.getLogger("ray.serve")
M = TypeVar("M")

# The typed contents field that carries each datatype (FP16 and BF16 travel only as raw bytes).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def set_parameter(target: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        target[key].bool_param = value
    elif isinstance(value, int):
        target[key].int64_param = value
    elif isinstance(value, float):
        target[key].double_param = value
    else:
        target[key].string_param = str(value)


def request_from_proto(msg: pb.ModelInferRequest) -> oip.InferRequest:
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs", "raw_input_contents"
        )
    inputs = []
    for i, t in enumerate(msg.inputs):
        field = f"inputs[{i}] `{t.name}`"
        if raw:
            inputs.append(from_raw(t.name, t.datatype, list(t.shape), raw[i], field))
        elif t.datatype in ("FP16", "BF16"):
            raise InvalidInput(f"{field}: {t.datatype} has no typed contents; send it in raw_input_contents", field)
        else:
            contents = getattr(t.contents, CONTENTS_FIELD.get(t.datatype, "bytes_contents"))
            inputs.append(from_elements(t.name, t.datatype, list(t.shape), contents, field))
    return oip.InferRequest(
        model=msg.model_name,
        version=msg.model_version,
        id=msg.id,
        inputs=inputs,
        parameters={k: parameter_value(v) for k, v in msg.parameters.items()},
        outputs=[o.name for o in msg.outputs] or None,
    )


def response_to_proto(resp: oip.InferResponse, raw: bool) -> pb.ModelInferResponse:
    """Raw output contents when the request sent raw inputs (what Triton's client reads), else typed."""
    msg = pb.ModelInferResponse(model_name=resp.model, model_version=oip.VERSION, id=resp.id)
    for key, value in resp.parameters.items():
        set_parameter(msg.parameters, key, value)
    for t in resp.outputs:
        out = msg.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        if raw:
            msg.raw_output_contents.append(to_raw(t))
        else:
            getattr(out.contents, CONTENTS_FIELD[t.datatype]).extend(_elements(t))
    return msg


def _elements(t: Tensor) -> list:
    return t.data if t.datatype == "BYTES" else t.data.tolist()


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The table's gRPC code and message for an exception; a bug is logged and leaks nothing."""
    mapped = as_rayinfer_error(exc)
    if isinstance(mapped, RayInferError):
        return grpc.StatusCode[kind_of(mapped).grpc_code], mapped.message
    logger.error("unhandled error in a gRPC call", exc_info=exc)
    return grpc.StatusCode[INTERNAL.grpc_code], "internal server error"


def check_key(context: Any, keys: tuple[bytes, ...]) -> None:
    """API keys over gRPC: `authorization: Bearer <key>` call metadata, as over HTTP."""
    if keys:
        metadata = dict(context.invocation_metadata()) if context is not None else {}
        given = metadata.get("authorization")
        if not key_matches(given.encode() if isinstance(given, str) else given, keys):
            raise Unauthorized("Incorrect or missing API key: send `authorization: Bearer <key>` metadata.")


def call_deadline(context: Any) -> float | None:
    """The call's deadline, from `x-request-timeout-seconds` metadata (as over HTTP). gRPC's own deadline
    (`grpc-timeout`) cancels the call when it passes, and with it the work not yet sent (the edge batcher
    drops a cancelled request), but Serve's RayServegRPCContext does not pass its time remaining on."""
    metadata = dict(context.invocation_metadata()) if context is not None else {}
    value = metadata.get(deadline.TIMEOUT_HEADER.decode())
    return deadline.from_header(value.encode() if isinstance(value, str) else value)


def _fail(context: Any, exc: BaseException) -> ErrorKind:
    """End the RPC with the table's code and message for `exc` (and, when overloaded,
    `grpc-retry-pushback-ms`: gRPC's Retry-After); returns the table's row."""
    mapped = as_rayinfer_error(exc)
    code, message = status_of(exc)
    context.set_code(code)
    context.set_details(message)
    if isinstance(mapped, Overloaded):
        context.set_trailing_metadata([("grpc-retry-pushback-ms", str(mapped.retry_after_s * 1000))])
    return kind_of(mapped) if isinstance(mapped, RayInferError) else INTERNAL


async def _answer(
    context: Any,
    empty: M,
    make: Callable[[], Awaitable[M]],
    rpc: str,
    keys: tuple[bytes, ...] = (),
    gate: InflightGate | None = None,
) -> M:
    """Run one unary RPC: errors become the table's gRPC code; latency and errors are recorded as
    for HTTP (route `grpc <RPC>`, status class from the table's HTTP status). With a gate (inference
    RPCs), the ingress's in-flight bound applies as over HTTP: UNAVAILABLE at once when full, with
    `grpc-retry-pushback-ms` trailing metadata (gRPC's Retry-After)."""
    labels = metrics.RequestLabels(start=time.perf_counter())
    token = metrics.CURRENT.set(labels)
    deadline_token = deadline.CURRENT.set(call_deadline(context))
    recorder, status = metrics.ingress(), 200
    recorder.started()
    try:
        check_key(context, keys)
        with gate if gate is not None else contextlib.nullcontext():
            return await make()
    except asyncio.CancelledError:  # deadline or client gone: not caught, so the work stops
        status, labels.error = 499, "cancelled"
        raise
    except Exception as exc:
        kind = _fail(context, exc)
        status, labels.error = kind.http_status, kind.code
        return empty
    finally:
        recorder.finished(f"grpc {rpc}", labels, status)
        metrics.CURRENT.reset(token)
        deadline.CURRENT.reset(deadline_token)


class GRPCInferenceServicer:
    """The RPCs of `inference.GRPCInferenceService`; mixed into the ingress deployment."""

    # Set by the ingress's constructor: the core it adapts, its API keys (empty: none required) and
    # its in-flight bound, shared with HTTP.
    registry: ModelRegistry
    api_keys: tuple[bytes, ...]
    inflight: InflightGate

    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await oip.server_ready(self.registry))

    async def ModelReady(self, request: pb.ModelReadyRequest, grpc_context: Any = None) -> pb.ModelReadyResponse:
        async def ready():
            return pb.ModelReadyResponse(ready=await oip.model_ready(self.registry, request.name, request.version))

        return await _answer(grpc_context, pb.ModelReadyResponse(), ready, "ModelReady", self.api_keys)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        meta = oip.server_metadata()
        return pb.ServerMetadataResponse(name=meta.name, version=meta.version, extensions=list(meta.extensions))

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, grpc_context: Any = None
    ) -> pb.ModelMetadataResponse:
        async def describe():
            meta = await oip.metadata(self.registry, request.name, request.version)
            spec = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta.name,
                versions=list(meta.versions),
                platform=meta.platform,
                inputs=[spec(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in meta.inputs],
                outputs=[spec(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in meta.outputs],
            )

        return await _answer(grpc_context, pb.ModelMetadataResponse(), describe, "ModelMetadata", self.api_keys)

    async def ModelInfer(self, request: pb.ModelInferRequest, grpc_context: Any = None) -> pb.ModelInferResponse:
        async def run():
            resp = await oip.infer(self.registry, request_from_proto(request))
            return response_to_proto(resp, raw=bool(request.raw_input_contents))

        return await _answer(grpc_context, pb.ModelInferResponse(), run, "ModelInfer", self.api_keys, self.inflight)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], grpc_context: Any = None
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's streaming RPC: the stream's requests are served in turn, each answered by its
        responses as they come; a request's error is an `error_message` and the stream goes on."""
        try:
            check_key(grpc_context, self.api_keys)
            # The whole stream counts as one request in flight.
            with self.inflight:
                async for request in requests:
                    raw = bool(request.raw_input_contents)
                    try:
                        async for resp in oip.infer_stream(self.registry, request_from_proto(request)):
                            yield pb.ModelStreamInferResponse(infer_response=response_to_proto(resp, raw))
                    except Exception as exc:  # a request's error: in-band, and the stream goes on
                        _, message = status_of(exc)
                        echo = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                        yield pb.ModelStreamInferResponse(error_message=message, infer_response=echo)
        except (Unauthorized, Overloaded) as exc:  # refused before its first request
            _fail(grpc_context, exc)

    async def RepositoryModelLoad(self, request: Any, grpc_context: Any = None) -> pb.RepositoryModelLoadResponse:
        return _unimplemented(grpc_context, pb.RepositoryModelLoadResponse(model_name=request.model_name))

    async def RepositoryModelUnload(self, request: Any, grpc_context: Any = None) -> pb.RepositoryModelUnloadResponse:
        return _unimplemented(grpc_context, pb.RepositoryModelUnloadResponse(model_name=request.model_name))


def _unimplemented(context: Any, empty: M) -> M:
    # Not an error of the request: the model repository extension is not offered at all.
    context.set_code(grpc.StatusCode.UNIMPLEMENTED)
    context.set_details("the model repository extension is not supported: models come from serve_config.yaml")
    return empty
