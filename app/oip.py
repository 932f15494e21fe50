"""Open Inference Protocol v2 (KServe / Triton) over the registry, for any wire.

The REST and gRPC adapters turn their messages into these records and back; nothing here
knows HTTP or gRPC. Each model has a fixed signature (its metadata):

- an embedding model takes BYTES `text` [N] and gives FP32 `embedding` [N, dim];
- a generation model takes BYTES `text_input` [N] plus the request parameters `max_tokens`,
  `temperature`, `top_p`, `seed`, `stop`, and gives BYTES `text_output` [N] and
  `finish_reason` [N], as Triton's LLM models do.

Underneath run the same validation and jobs as /v1/embeddings and /v1/completions, so the
vectors and texts are the same for the same inputs and parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from typing import Any, AsyncIterator

from pydantic import BaseModel, ValidationError

from app.completion_schemas import CompletionRequest
from app.completions import collect
from app.completions import to_job as completion_job
from app.config import ModelConfig
from app.errors import InvalidInput, ModelNotFound, RayInferError
from app.oip_tensors import Tensor, texts_of
from app.openai_api import to_job as embedding_job
from app.registry import ModelRegistry
from app.schemas import EmbeddingRequest
from deployments.types import GenerateJob

SERVER_NAME = "rayinfer"
EXTENSIONS = ("parameters",)  # request parameters carry the sampling settings
PLATFORM = "pytorch"
VERSION = "1"  # one copy of each model: a request names it with "" or "1"
INPUT = {"embed": "text", "generate": "text_input"}
OUTPUTS = {"embed": ("embedding",), "generate": ("text_output", "finish_reason")}
PARAMETERS = {"embed": (), "generate": ("max_tokens", "temperature", "top_p", "seed", "stop")}
FINAL = "triton_final_response"  # streamed responses: true on a request's last one, as Triton marks it


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    platform: str
    versions: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True)
class InferRequest:
    model: str
    inputs: list[Tensor]
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] | None = None  # the outputs to return; None: all of them
    id: str = ""
    version: str = ""


@dataclass(frozen=True)
class InferResponse:
    model: str
    id: str
    outputs: list[Tensor]
    parameters: dict[str, Any] = field(default_factory=dict)


def server_metadata() -> ServerMetadata:
    return ServerMetadata(SERVER_NAME, package_version("rayinfer"), EXTENSIONS)


def find(registry: ModelRegistry, name: str, version: str = "") -> ModelConfig:
    """The model's config; ModelNotFound for an unknown name or version."""
    cfg = registry.model(name, task=None)
    if version not in ("", VERSION):
        raise ModelNotFound(f"The model `{name}` has no version {version!r}; it serves version {VERSION}", "model_version")
    return cfg


async def server_ready(registry: ModelRegistry) -> bool:
    return not await registry.not_ready()


async def model_ready(registry: ModelRegistry, name: str, version: str = "") -> bool:
    find(registry, name, version)
    return not await registry.not_ready([name])


async def metadata(registry: ModelRegistry, name: str, version: str = "") -> ModelMetadata:
    cfg = find(registry, name, version)
    if cfg.task == "embed":
        dim = (await registry.info(name, timeout_s=registry.config.ready_timeout_s)).dim
        outputs = (TensorSpec("embedding", "FP32", (-1, dim)),)
    else:
        outputs = tuple(TensorSpec(n, "BYTES", (-1,)) for n in OUTPUTS["generate"])
    return ModelMetadata(name, PLATFORM, (VERSION,), (TensorSpec(INPUT[cfg.task], "BYTES", (-1,)),), outputs)


async def infer(registry: ModelRegistry, req: InferRequest) -> InferResponse:
    """Run the request to its end: embeddings, or each prompt's whole completion."""
    cfg = _checked_model(registry, req)
    if cfg.task == "embed":
        return _response(req, await _embed(registry, cfg, req))
    texts, finish = await collect(registry, cfg.name, _generate_job(cfg, req))
    return _response(req, _generated(texts, finish))


async def infer_stream(registry: ModelRegistry, req: InferRequest) -> AsyncIterator[InferResponse]:
    """Generation as it happens: each response holds every prompt's new text (`""` for none yet)
    and its finish reason (`""` while running); the last is marked `triton_final_response`.
    An embedding model answers with one response."""
    cfg = _checked_model(registry, req)
    if cfg.task == "embed":
        yield _response(req, await _embed(registry, cfg, req), {FINAL: True})
        return
    job = _generate_job(cfg, req)
    finish = [""] * len(job)
    async for item in registry.generate(cfg.name, job):
        if isinstance(item, RayInferError):
            raise item
        deltas = [""] * len(job)
        for chunk in item:
            deltas[chunk.index] += chunk.text
            finish[chunk.index] = chunk.finish_reason or finish[chunk.index]
        final = all(finish)
        if any(deltas) or final:  # text held back (a possible stop string) sends nothing yet
            yield _response(req, _generated(deltas, finish), {FINAL: final})


def _checked_model(registry: ModelRegistry, req: InferRequest) -> ModelConfig:
    """The model, once the request's parameters and requested outputs are known to fit it."""
    cfg = find(registry, req.model, req.version)
    allowed = PARAMETERS[cfg.task]
    unknown = sorted(set(req.parameters) - set(allowed))
    if unknown:
        supported = ", ".join(allowed) or "none"
        raise InvalidInput(
            f"parameters.{unknown[0]}: not supported by model `{cfg.name}`; supported: {supported}",
            f"parameters.{unknown[0]}",
        )
    for name in req.outputs or ():
        if name not in OUTPUTS[cfg.task]:
            raise InvalidInput(
                f"outputs: model `{cfg.name}` has no output `{name}`; it has {', '.join(OUTPUTS[cfg.task])}", "outputs"
            )
    return cfg


def _texts(cfg: ModelConfig, req: InferRequest) -> tuple[str, list[str]]:
    """The model's one text input, by name."""
    expected = INPUT[cfg.task]
    others = [t.name for t in req.inputs if t.name != expected]
    found = [t for t in req.inputs if t.name == expected]
    if len(found) != 1 or others:
        if not found:
            problem = f"missing input `{expected}`"
        elif len(found) > 1:
            problem = f"input `{expected}` given {len(found)} times"
        else:
            problem = f"unexpected input `{others[0]}`"
        raise InvalidInput(f"{problem}: model `{cfg.name}` takes one BYTES input `{expected}` of shape [N]", expected)
    return expected, texts_of(found[0], expected)


def _validated(schema: type[BaseModel], data: dict[str, Any], input_name: str) -> Any:
    """The request as the OpenAI routes validate it, with errors naming the OIP input or parameter."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ())]
        where = input_name if loc[:1] in (["input"], ["prompt"]) else ".".join(["parameters", *loc[:1]])
        raise InvalidInput(f"{where}: {err['msg'].removeprefix('Value error, ')}", where) from None


async def _embed(registry: ModelRegistry, cfg: ModelConfig, req: InferRequest) -> list[Tensor]:
    name, texts = _texts(cfg, req)
    body = _validated(EmbeddingRequest, {"model": cfg.name, "input": texts}, name)
    result = await registry.embed(cfg.name, embedding_job(body, cfg.max_inputs_per_request))
    if isinstance(result, RayInferError):
        raise result
    vectors = result.vectors.astype("<f4", copy=False)
    return [Tensor("embedding", "FP32", vectors.shape, vectors.reshape(-1))]


def _generate_job(cfg: ModelConfig, req: InferRequest) -> GenerateJob:
    name, prompts = _texts(cfg, req)
    return completion_job(_validated(CompletionRequest, {**req.parameters, "model": cfg.name, "prompt": prompts}, name))


def _generated(texts: list[str], finish: list[str | None]) -> list[Tensor]:
    n = len(texts)
    return [
        Tensor("text_output", "BYTES", (n,), [t.encode("utf-8") for t in texts]),
        Tensor("finish_reason", "BYTES", (n,), [(f or "").encode("utf-8") for f in finish]),
    ]


def _response(req: InferRequest, outputs: list[Tensor], parameters: dict[str, Any] | None = None) -> InferResponse:
    if req.outputs:
        outputs = [t for t in outputs if t.name in req.outputs]
    return InferResponse(req.model, req.id, outputs, parameters or {})
