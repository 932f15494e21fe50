"""OpenAI-compatible wire schemas (https://platform.openai.com/docs/api-reference/embeddings)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

EmbeddingInput = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]

INPUT_SHAPES = "a non-empty string, a list of non-empty strings, a list of token ids, or a list of token-id lists"


def check_input(value: Any, field: str = "input") -> Any:
    """Explain a bad `input` (or `prompt`) in one sentence, instead of pydantic's four-way union error."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{field} must not be an empty string")
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(f"{field} must be {INPUT_SHAPES}")
    first = value[0]
    if isinstance(first, str):
        kind_ok = lambda x: isinstance(x, str) and x != ""  # noqa: E731
    elif isinstance(first, int) and not isinstance(first, bool):
        kind_ok = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    elif isinstance(first, list):
        kind_ok = lambda x: (  # noqa: E731
            isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
        )
    else:
        raise ValueError(f"{field} must be {INPUT_SHAPES}")
    bad = next((i for i, x in enumerate(value) if not kind_ok(x)), None)
    if bad is not None:
        raise ValueError(
            f"{field}[{bad}] is empty or not of the same kind as {field}[0]; {field} must be {INPUT_SHAPES}"
        )
    return value


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: EmbeddingInput = Field(description=f"What to embed: {INPUT_SHAPES}.")
    model: StrictStr = Field(description="A model id from GET /v1/models.")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32.")
    dimensions: StrictInt | None = Field(None, ge=1, description="Must equal the model's dimension if given.")
    user: StrictStr | None = Field(None, description="Accepted and ignored, as OpenAI's API allows.")

    _check_input = field_validator("input", mode="before")(lambda v: check_input(v))


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rayinfer"
    root: str = Field(description="The resolved local checkpoint directory.")
    task: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
