"""OpenAI-compatible completion wire schemas (https://platform.openai.com/docs/api-reference/completions,
/chat). Parameters rayinfer does not implement are accepted only at their neutral value; any
other value is a 400 naming the field, never silently ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

from app.schemas import Usage, check_input

MAX_STOP = 4  # OpenAI's own limit
MAX_PROMPTS = 64
UNSUPPORTED_NEUTRAL = (
    "echo", "logprobs", "top_logprobs", "suffix", "logit_bias", "presence_penalty", "frequency_penalty", "tools",
    "response_format",
)  # accepted when absent, null, false, 0 or empty


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = Field(False, description="Send a last chunk with `usage` and no choices.")


class SamplingFields(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr = Field(description="A model id from GET /v1/models whose task is `generate`.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy.", allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.", allow_inf_nan=False)
    n: StrictInt = Field(1, ge=1, le=16, description="Choices per prompt.")
    best_of: StrictInt | None = Field(None, ge=1, le=16, description="Only equal to `n` (or absent) is supported.")
    stop: StrictStr | list[StrictStr] | None = Field(None, description=f"Up to {MAX_STOP} stop strings.")
    seed: StrictInt | None = Field(
        None, ge=-(2**63), lt=2**63, description="Same seed, prompt and parameters: same sample."
    )
    stream: StrictBool = Field(False, description="Server-sent events in OpenAI's chunk format, ending `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    user: StrictStr | None = Field(None, description="Accepted and ignored.")
    # Accepted only at their neutral value (see UNSUPPORTED_NEUTRAL).
    echo: StrictBool = False
    logprobs: Any = None
    top_logprobs: Any = None
    suffix: Any = None
    logit_bias: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    tools: Any = None
    response_format: Any = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _neutral_only(self) -> "SamplingFields":
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

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        value = check_input(value, "prompt")
        if isinstance(value, list) and value and not isinstance(value[0], int) and len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return value


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

    @field_validator("messages")
    @classmethod
    def _text_only(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        for message in messages:
            message.text()
        return messages


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class CompletionUsage(Usage):
    completion_tokens: int


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


CompletionResponse.model_rebuild()
