"""OpenAI's completions and chat completions over the registry: whole responses and server-sent
event streams (OpenAI's chunk format, ending `data: [DONE]`)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from app.core import metrics
from app.core.errors import RayInferError, kind_of
from app.core.generation import collect, fold
from app.core.inputs import as_list
from app.core.registry import ModelRegistry, as_rayinfer_error
from app.openai.errors import error_body
from app.openai.protocol import ChatCompletionRequest, CompletionRequest
from deployments.types import GenerateChunk, GenerateJob, TokenLogprob


def to_job(req: CompletionRequest | ChatCompletionRequest) -> GenerateJob:
    if isinstance(req, ChatCompletionRequest):
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = req.params(req.max_completion_tokens or req.max_tokens, logprobs)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return GenerateJob(params=params, messages=messages, n=req.n)
    return GenerateJob(params=req.params(req.max_tokens, req.logprobs), prompts=as_list(req.prompt), n=req.n)


class Completion:
    """One request's response in OpenAI's shape: `text_completion` or `chat.completion`."""

    def __init__(self, req: CompletionRequest | ChatCompletionRequest):
        self.chat = isinstance(req, ChatCompletionRequest)
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = req.model
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.prompt_tokens: dict[int, int] = {}
        self.completion_tokens: dict[int, int] = {}
        self.logprobs: dict[int, list[TokenLogprob]] = {}  # each choice's, when asked for
        self.text_offset: dict[int, int] = {}  # completions' logprobs.text_offset: characters so far

    def count(self, chunk: GenerateChunk) -> None:
        self.prompt_tokens[chunk.index] = chunk.prompt_tokens
        self.completion_tokens[chunk.index] = chunk.completion_tokens
        if chunk.logprobs is not None:
            self.logprobs.setdefault(chunk.index, []).extend(chunk.logprobs)

    def format_logprobs(self, index: int, tokens: list[TokenLogprob] | None) -> dict | None:
        """OpenAI's logprobs object for these tokens of choice `index` (chat: `content`; completions:
        the four parallel lists). None when the request asked for none."""
        if tokens is None:
            return None
        if self.chat:
            content = [
                {**_top(t.token, t.logprob), "top_logprobs": [_top(tok, lp) for tok, lp in t.top]} for t in tokens
            ]
            return {"content": content}
        offsets, at = [], self.text_offset.get(index, 0)
        for t in tokens:
            offsets.append(at)
            at += len(t.token)
        self.text_offset[index] = at
        return {
            "tokens": [t.token for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens],
            "text_offset": offsets,
        }

    def usage(self, n: int) -> dict:
        # Each prompt counts once, however many choices (n) sample it.
        prompt = sum(t for i, t in self.prompt_tokens.items() if i % n == 0)
        completion = sum(self.completion_tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def body(self, choices: list[dict], usage: dict | None) -> dict:
        obj = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
        }

    def choice(self, index: int, text: str, finish: str | None) -> dict:
        logprobs = self.format_logprobs(index, self.logprobs.get(index))
        if self.chat:
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return json.dumps(body, separators=(",", ":"))

    def delta(
        self,
        index: int,
        text: str | None,
        finish: str | None,
        role: bool = False,
        logprobs: list[TokenLogprob] | None = None,
    ) -> dict:
        lp = self.format_logprobs(index, logprobs)
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}


def _top(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


async def complete(registry: ModelRegistry, req: CompletionRequest | ChatCompletionRequest) -> dict:
    registry.model(req.model, task="generate")
    job, out = to_job(req), Completion(req)
    texts, finish = await collect(registry, req.model, job, out.count)
    choices = [out.choice(i, text, reason) for i, (text, reason) in enumerate(zip(texts, finish))]
    return out.body(choices, out.usage(job.n))


async def first_item(
    registry: ModelRegistry, req: CompletionRequest | ChatCompletionRequest
) -> tuple[GenerateJob, list[GenerateChunk], AsyncGenerator[list[GenerateChunk] | RayInferError, None]]:
    """Start a stream and wait for its first item, so a client error is still a plain 4xx, not a broken stream."""
    registry.model(req.model, task="generate")
    job = to_job(req)
    stream = registry.generate(req.model, job)
    first = await anext(stream)
    if isinstance(first, RayInferError):
        await stream.aclose()
        raise first
    return job, first, stream


async def sse_events(
    req: CompletionRequest | ChatCompletionRequest,
    job: GenerateJob,
    first: list[GenerateChunk],
    stream: AsyncGenerator[list[GenerateChunk] | RayInferError, None],
) -> AsyncIterator[str]:
    """The `data:` payloads of one stream; the caller's SSE response frames them."""
    out = Completion(req)
    request = metrics.CURRENT.get()  # for time to first token
    try:
        if out.chat:
            yield out.chunk([out.delta(i, None, None, role=True) for i in range(len(job))])
        item = first
        while True:
            for chunk in item:
                out.count(chunk)
            deltas = [
                out.delta(i, text, finish, logprobs=lps)
                for i, (text, finish, lps) in fold(item).items()
                if text or finish or lps
            ]
            if deltas:  # text held back (a possible stop string, half a character) sends nothing yet
                if request is not None:
                    metrics.ingress().ttft.observe(time.perf_counter() - request.start, {"model": out.model})
                    request = None
                yield out.chunk(deltas)
            following = await anext(stream, None)
            if following is None:
                break
            if isinstance(following, RayInferError):
                raise following
            item = following
        if out.include_usage:
            yield out.chunk([], out.usage(job.n))
    except Exception as exc:  # after the first byte the status is sent: report in-band, as OpenAI does
        mapped = as_rayinfer_error(exc)
        if not isinstance(mapped, RayInferError):
            raise
        yield json.dumps(error_body(mapped.message, kind_of(mapped), mapped.param))
    finally:
        await stream.aclose()
    yield "[DONE]"
