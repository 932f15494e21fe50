"""Checks on what a request asks a model to embed or complete, shared by every protocol.

Each protocol names its own field (`input` and `prompt` in OpenAI's API, a tensor's name in the
Open Inference Protocol); the rules and the jobs built from them are the same.
"""

from __future__ import annotations

from typing import Any

from app.core.errors import PayloadTooLarge
from deployments.types import EmbedJob

INPUT_SHAPES = "a non-empty string, a list of non-empty strings, a list of token ids, or a list of token-id lists"
MAX_PROMPTS = 64  # prompts in one generation request


def check_input(value: Any, field: str = "input") -> Any:
    """`value` if it is one of INPUT_SHAPES; else ValueError explaining what is wrong in one
    sentence (instead of pydantic's four-way union error)."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{field} must not be an empty string")
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(f"{field} must be {INPUT_SHAPES}")
    first = value[0]
    if isinstance(first, str):
        kind_ok = _nonempty_str
    elif isinstance(first, int) and not isinstance(first, bool):
        kind_ok = _token_id
    elif isinstance(first, list):
        kind_ok = _token_ids
    else:
        raise ValueError(f"{field} must be {INPUT_SHAPES}")
    bad = next((i for i, x in enumerate(value) if not kind_ok(x)), None)
    if bad is not None:
        raise ValueError(
            f"{field}[{bad}] is empty or not of the same kind as {field}[0]; {field} must be {INPUT_SHAPES}"
        )
    return value


def check_prompts(value: Any, field: str = "prompt") -> Any:
    """check_input, and at most MAX_PROMPTS prompts (a list of token ids is one prompt)."""
    value = check_input(value, field)
    if isinstance(value, list) and value and not isinstance(value[0], int) and len(value) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
    return value


def _nonempty_str(x: Any) -> bool:
    return isinstance(x, str) and x != ""


def _token_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _token_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(_token_id(t) for t in x)


def as_list(items: str | list) -> list:
    """One input (a string, or one list of token ids) as a list of one; a list of inputs as is."""
    if isinstance(items, str) or (items and isinstance(items[0], int)):
        return [items]
    return list(items)


def embed_job(items: str | list, max_items: int, field: str = "input") -> EmbedJob:
    """The job for a checked input; PayloadTooLarge (413) past the model's `max_inputs_per_request`."""
    items = as_list(items)
    if len(items) > max_items:
        raise PayloadTooLarge(f"{field} has {len(items)} items; at most {max_items} per request", field)
    if isinstance(items[0], str):
        return EmbedJob(texts=items)
    return EmbedJob(token_ids=[list(ids) for ids in items])
