"""Open Inference Protocol v2 (KServe / Triton) over the registry, for any wire.

The REST and gRPC adapters turn their messages into these records and back; nothing here
knows HTTP or gRPC. Each model has a fixed signature (its metadata):

- an embedding model takes BYTES `text` [N] and gives FP32 `embedding` [N, dim];
- a generation model takes BYTES `text_input` [N] plus the request parameters `max_tokens`,
  `temperature`, `top_p`, `seed`, `stop`, and gives BYTES `text_output` [N] and
  `finish_reason` [N], as Triton's LLM models do.

Underneath run the same protocol-neutral checks, sampling options and jobs as OpenAI's
/v1/embeddings and /v1/completions (app/core/), so the vectors and texts are the same for the same
inputs and parameters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from typing import Any

from pydantic import ConfigDict, Field, StrictInt, ValidationError

from app.config import ModelConfig
from app.core.errors import InvalidInput, ModelNotFound, RayInferError
from app.core.generation import collect, fold
from app.core.inputs import check_input, check_prompts, embed_job
from app.core.registry import ModelRegistry
from app.core.sampling import SamplingOptions
from app.oip.tensors import Tensor, texts_of
from deployments.types import GenerateJob

SERVER_NAME = "rayinfer"
# `parameters`: request parameters carry the sampling settings; `binary_tensor_data`: Triton's raw
# tensor bytes after the JSON of an HTTP request or response (app/oip/rest/binary.py).
EXTENSIONS = ("parameters", "binary_tensor_data")
PLATFORM = "pytorch"
VERSION = "1"  # one copy of each model: a request names it with "" or "1"
INPUT = {"embed": "text", "generate": "text_input"}
OUTPUTS = {"embed": ("embedding",), "generate": ("text_output", "finish_reason")}
FINAL = "triton_final_response"  # streamed responses: true on a request's last one, as Triton marks it


class GenerationParameters(SamplingOptions):
    """A generation model's request parameters: the sampling options, with `max_tokens` as
    /v1/completions defaults it."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: StrictInt = Field(16, ge=1, le=1_000_000, description="Most tokens to generate per prompt.")


PARAMETERS = {"embed": (), "generate": tuple(GenerationParameters.model_fields)}


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
        raise ModelNotFound(
            f"The model `{name}` has no version {version!r}; it serves version {VERSION}", "model_version"
        )
    return cfg


async def server_ready(registry: ModelRegistry) -> bool:
    return not await registry.not_ready()


async def model_ready(registry: ModelRegistry, name: str, version: str = "") -> bool:
    find(registry, name, version)
    return not await registry.not_ready([name])


async def metadata(registry: ModelRegistry, name: str, version: str = "") -> ModelMetadata:
    cfg = find(registry, name, version)
    outputs: tuple[TensorSpec, ...]
    if cfg.task == "embed":
        dim = (await registry.info(name, timeout_s=registry.config.ready_timeout_s)).dim or -1
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
        for index, (text, reason, _) in fold(item).items():
            deltas[index] = text
            finish[index] = reason or finish[index]
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


def _checked(check: Callable[..., Any], value: Any, field: str) -> Any:
    """A protocol-neutral input check, its error naming the OIP input."""
    try:
        return check(value, field)
    except ValueError as exc:
        raise InvalidInput(f"{field}: {exc}", field) from None


async def _embed(registry: ModelRegistry, cfg: ModelConfig, req: InferRequest) -> list[Tensor]:
    name, texts = _texts(cfg, req)
    job = embed_job(_checked(check_input, texts, name), cfg.max_inputs_per_request, name)
    result = await registry.embed(cfg.name, job)
    if isinstance(result, RayInferError):
        raise result
    vectors = result.vectors.astype("<f4", copy=False)
    return [Tensor("embedding", "FP32", vectors.shape, vectors.reshape(-1))]


def _generate_job(cfg: ModelConfig, req: InferRequest) -> GenerateJob:
    name, prompts = _texts(cfg, req)
    prompts = _checked(check_prompts, prompts, name)
    try:
        params = GenerationParameters.model_validate(req.parameters)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(["parameters", *(str(p) for p in err.get("loc", ())[:1])])
        raise InvalidInput(f"{where}: {err['msg'].removeprefix('Value error, ')}", where) from None
    return GenerateJob(params=params.params(params.max_tokens), prompts=list(prompts))


def _generated(texts: list[str], finish: Sequence[str | None]) -> list[Tensor]:
    n = len(texts)
    return [
        Tensor("text_output", "BYTES", (n,), [t.encode("utf-8") for t in texts]),
        Tensor("finish_reason", "BYTES", (n,), [(f or "").encode("utf-8") for f in finish]),
    ]


def _response(req: InferRequest, outputs: list[Tensor], parameters: dict[str, Any] | None = None) -> InferResponse:
    if req.outputs:
        outputs = [t for t in outputs if t.name in req.outputs]
    return InferResponse(req.model, req.id, outputs, parameters or {})
