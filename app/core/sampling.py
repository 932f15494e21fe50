"""Sampling settings every protocol accepts, validated once: OpenAI's request fields and the Open
Inference Protocol's request parameters are both this model (each adds its own `max_tokens`
default and its protocol-only fields)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from models.params import SamplingParams

MAX_STOP = 4  # OpenAI's own limit


class SamplingOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy.", allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.", allow_inf_nan=False)
    stop: StrictStr | list[StrictStr] | None = Field(
        None, description=f"Up to {MAX_STOP} stop strings; the text ends before the first one generated."
    )
    seed: StrictInt | None = Field(
        None, ge=-(2**63), lt=2**63, description="Same seed, prompt and parameters: same sample."
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, allow_inf_nan=False, description="Penalise tokens already in the text, once each."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, allow_inf_nan=False, description="Penalise tokens by how often they appeared."
    )
    min_tokens: StrictInt = Field(
        0, ge=0, le=1_000_000, description="No end of sequence or stop string before this many tokens (vLLM's)."
    )
    ignore_eos: StrictBool = Field(False, description="Generate past end of sequence, to max_tokens (vLLM's).")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def params(self, max_tokens: int | None, logprobs: int | None = None) -> SamplingParams:
        """The engine's record; `max_tokens` None: what the context leaves; `logprobs` k: each sampled
        token's log probability and the k most likely (None: none)."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop or ()),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )
