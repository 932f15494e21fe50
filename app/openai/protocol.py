"""OpenAI's wire schemas (https://platform.openai.com/docs/api-reference): embeddings,
completions, chat completions, models, errors. Parameters rayinfer does not implement are
accepted only at their neutral value; any other value is a 400 naming the field, never silently
ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

from app.core.inputs import INPUT_SHAPES, check_input, check_prompts
from app.core.sampling import SamplingOptions

# Accepted when absent, null, false, 0 or empty.
UNSUPPORTED_NEUTRAL = ("echo", "suffix", "logit_bias", "tools", "response_format")
MAX_LOGPROBS = 5  # completions' `logprobs` (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # chat's `top_logprobs` (OpenAI's limit; vLLM's default max_logprobs)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# Embeddings


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description=f"What to embed: {INPUT_SHAPES}."
    )
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


# Models


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


# Completions and chat completions


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = Field(False, description="Send a last chunk with `usage` and no choices.")


class SamplingFields(SamplingOptions):
    """What completions and chat completions share, beyond the protocol-neutral sampling options."""

    model: StrictStr = Field(description="A model id from GET /v1/models whose task is `generate`.")
    n: StrictInt = Field(1, ge=1, le=16, description="Choices per prompt.")
    best_of: StrictInt | None = Field(None, ge=1, le=16, description="Only equal to `n` (or absent) is supported.")
    stream: StrictBool = Field(False, description="Server-sent events in OpenAI's chunk format, ending `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    user: StrictStr | None = Field(None, description="Accepted and ignored.")
    # Accepted only at their neutral value (see UNSUPPORTED_NEUTRAL).
    echo: StrictBool = False
    suffix: Any = None
    logit_bias: Any = None
    tools: Any = None
    response_format: Any = None

    @model_validator(mode="after")
    def _neutral_only(self) -> SamplingFields:
        for name in UNSUPPORTED_NEUTRAL:
            if name in self.model_fields_set and getattr(self, name):  # set to a non-neutral value
                raise ValueError(f"{name}: not supported by rayinfer; leave it unset")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists."
    )
    max_tokens: StrictInt = Field(16, ge=1, le=1_000_000, description="Most tokens to generate per choice.")
    logprobs: StrictInt | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Log probabilities of each sampled token and of the this-many most likely ones.",
    )

    _check_prompt = field_validator("prompt", mode="before")(lambda v: check_prompts(v, "prompt"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[dict[str, Any]] = Field(description="Text, or a list of `{type: text, text}` parts.")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: StrictInt | None = Field(
        None, ge=1, le=1_000_000, description="Most tokens to generate; default: what the context leaves."
    )
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=1_000_000, description="Alias of max_tokens.")
    logprobs: StrictBool = Field(False, description="Return each output token's log probability.")
    top_logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="With logprobs: also the this-many most likely tokens."
    )

    @model_validator(mode="after")
    def _top_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs set to true")
        return self

    @field_validator("messages")
    @classmethod
    def _text_only(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        for message in messages:
            message.text()
        return messages


class CompletionUsage(Usage):
    completion_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
