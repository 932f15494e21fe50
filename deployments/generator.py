"""The Generator deployment: one replica runs vLLM's async engine (V1 `AsyncLLM`) for one causal LM.

vLLM does the continuous batching, paged KV cache, sampling, stop strings and detokenization; its
engine core runs in a child process of the replica (on GPUs with tensor/pipeline parallelism, in
Ray workers on the replica's placement group). This deployment adds what the API promises around
it: prompts checked and tokenized (chat templates, context limits: 400s naming the numbers), `n`
choices with seeds `seed + j`, stream chunks coalesced within `stream_interval_s`, a dropped caller
aborting its requests in the engine, a dead engine reported as `ReplicaLost` (the ingress retries
on another replica) and failing `check_health`, and the engine's own stats as rayinfer's metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from app.config import ModelConfig
from app.core.deadline import REPLICA_DRAIN_S, exceeded, expired
from app.core.errors import InputTooLong, InvalidInput, RayInferError, ReplicaLost
from deployments.engine_stats import EngineStats
from deployments.types import GenerateChunk, GenerateJob, ModelInfo, TokenLogprob
from models.loader import resolve_source
from models.params import SamplingParams
from models.vllm_engine import build_engine, to_vllm

logger = logging.getLogger("ray.serve")
IDLE_PROBE_AFTER_S = 5.0  # check_health runs a real one-token generation when the engine was idle this long


# max_ongoing_requests comes from the model config (app/main.py: enough for a full batch and the next).
# The health check may generate a token on a busy machine: a minute before Serve gives up on it.
# A stopping replica finishes the generations it holds (REPLICA_DRAIN_S).
@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=REPLICA_DRAIN_S,
)
class Generator:
    """Completions on vLLM; streams chunks or returns whole choices."""

    def __init__(self, cfg: ModelConfig):
        from transformers import AutoTokenizer

        self.cfg = cfg
        root = resolve_source(cfg.source)
        self.stats_sink = EngineStats(cfg.name)
        self.engine = build_engine(cfg, root, stat_loggers=[self.stats_sink.factory])
        # The checkpoint's own tokenizer, as vLLM's server uses it: prompts are checked against the
        # context before they reach the engine, and the engine gets token ids.
        self.tokenizer = AutoTokenizer.from_pretrained(root)
        model_config = self.engine.model_config
        self.context = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        self.info = ModelInfo(
            name=cfg.name,
            task=cfg.task,
            root=str(root),
            dim=None,
            max_input_tokens=self.context,
            vocab_size=self.vocab_size,
            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
        )
        self._last_output = time.monotonic()
        # Jobs stopped by their deadline: before their first token (generate_queue: the engine never
        # ran them, or aborted them while queued) or while generating (generate_running).
        self.expired: dict[str, int] = {}
        self.submitted = 0  # sequences of jobs handed to the engine (health probes not counted)
        logger.info(
            "Generator %s: vLLM engine on %s, context %d, dtype %s", cfg.name, root, self.context, model_config.dtype
        )

    async def metadata(self) -> ModelInfo:
        return self.info

    async def check_health(self) -> None:
        """Serve's health check: the engine core is alive, and an idle engine generates a real token.

        A busy engine shows its health by its output; probing it would queue behind its batch."""
        if self.engine.errored:
            raise RuntimeError(f"the vLLM engine has died: {self.engine.dead_error}")
        await self.engine.check_health()
        if self.engine.get_num_unfinished_requests() or time.monotonic() - self._last_output < IDLE_PROBE_AFTER_S:
            return
        ids = self.tokenizer("ok")["input_ids"] or [0]
        outs = [o async for o in self._engine_stream(f"health-{uuid.uuid4().hex}", ids, to_vllm(SamplingParams(), 1))]
        if not outs or not outs[-1].outputs or not outs[-1].outputs[0].token_ids:
            raise RuntimeError("the engine generated no token for the health probe")

    async def stats(self) -> dict[str, int]:
        """Engine steps, tokens generated, sequences running and waiting (last step), the most run at once,
        requests not finished in the engine's frontend (queued, running or in transit), sequences submitted,
        and jobs stopped by their deadline (expired_generate_queue, expired_generate_running)."""
        counts = self.stats_sink.counts
        expired = {f"expired_{stage}": n for stage, n in self.expired.items()}
        unfinished = self.engine.get_num_unfinished_requests()
        return {**counts, "unfinished": unfinished, "submitted": self.submitted, **expired}

    async def generate(self, job: GenerateJob) -> AsyncIterator[list[GenerateChunk] | RayInferError]:
        """Stream the job's chunks; a client error is the first and only item, as a value."""
        if expired(job.deadline):  # it waited past its deadline in a queue: the engine never sees it
            yield self._expired()
            return
        seqs = self._prepare(job)
        if isinstance(seqs, RayInferError):
            yield seqs
            return
        if self.engine.errored:
            yield ReplicaLost("the model's engine has died; retry")
            return
        queue: asyncio.Queue[GenerateChunk | RayInferError] = asyncio.Queue()
        rid = uuid.uuid4().hex
        ids = [f"{rid}-{i}" for i in range(len(seqs))]
        self.submitted += len(seqs)
        tasks = [
            asyncio.create_task(self._pump(ids[i], i, prompt, params, queue)) for i, (prompt, params) in enumerate(seqs)
        ]
        running, last_yield = len(seqs), 0.0  # the first chunk leaves at once: time to first token is not delayed
        loop = asyncio.get_running_loop()
        try:
            while running:
                item = await self._next(queue, job.deadline)
                if item is None:  # the deadline passed: aborted in the engine (finally, below)
                    yield self._expired("generate_running" if last_yield else "generate_queue")
                    return
                items = [item]
                # Tokens arriving within stream_interval_s of the last chunk ride with the next one:
                # fewer, larger messages through the handle, the ingress and the client.
                wait = last_yield + self.cfg.stream_interval_s - loop.time()
                if wait > 0 and isinstance(items[0], GenerateChunk) and items[0].finish_reason is None:
                    await asyncio.sleep(wait)
                while not queue.empty():
                    items.append(queue.get_nowait())
                chunks: list[GenerateChunk] = []
                for item in items:
                    if isinstance(item, RayInferError):
                        yield item
                        return
                    chunks.append(item)
                running -= sum(1 for c in chunks if c.finish_reason is not None)
                yield chunks
                last_yield = loop.time()
        finally:
            for task in tasks:  # the caller left (disconnect, deadline) or the job ended: nothing runs for nobody
                task.cancel()
            await self.engine.abort(ids)

    def _expired(self, stage: str = "generate_queue") -> RayInferError:
        self.expired[stage] = self.expired.get(stage, 0) + 1
        return exceeded(stage, self.cfg.name)

    @staticmethod
    async def _next(queue: asyncio.Queue, deadline: float | None) -> GenerateChunk | RayInferError | None:
        """The job's next item, or None if its deadline passes first."""
        if deadline is None:
            return await queue.get()
        try:
            return await asyncio.wait_for(queue.get(), max(0.0, deadline - time.time()))
        except asyncio.TimeoutError:
            return None

    async def _pump(self, request_id: str, index: int, prompt: list[int], params: Any, queue: asyncio.Queue) -> None:
        """One sequence's engine outputs into the job's queue as chunks."""
        generated = 0
        try:
            async for out in self._engine_stream(request_id, prompt, params):
                c = out.outputs[0]
                generated += len(c.token_ids)
                finish = (c.finish_reason or "stop") if out.finished else None
                queue.put_nowait(
                    GenerateChunk(index, c.text, finish, len(prompt), generated, _logprobs(c, params.logprobs))
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("generation %s failed", request_id)
            queue.put_nowait(ReplicaLost(f"generation failed on the replica ({type(exc).__name__}); retry"))

    async def _engine_stream(self, request_id: str, prompt: list[int], params: Any) -> AsyncIterator[Any]:
        async for out in self.engine.generate({"prompt_token_ids": prompt}, params, request_id):
            self._last_output = time.monotonic()
            yield out

    def _prepare(self, job: GenerateJob) -> list[tuple[list[int], Any]] | RayInferError:
        """Token ids and vLLM sampling params per sequence, or the client error the job deserves."""
        prompts = self._prompts(job)
        if isinstance(prompts, RayInferError):
            return prompts
        field = "messages" if job.messages is not None else "prompt"
        p, seqs = job.params, []
        for prompt in prompts:
            if not prompt:
                return InvalidInput("prompt is empty after tokenization", field)
            max_tokens = p.max_tokens or self.context - len(prompt)
            if len(prompt) + max_tokens > self.context:
                return InputTooLong(
                    f"This model's maximum context length is {self.context} tokens. However, you requested "
                    f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the {field}, {max_tokens} for the "
                    f"completion). Reduce the length of the {field} or max_tokens.",
                    "max_tokens" if len(prompt) < self.context else field,
                )
            if p.min_tokens > max_tokens:
                return InvalidInput(
                    f"min_tokens ({p.min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens"
                )
            for j in range(job.n):
                seqs.append((prompt, to_vllm(p, max_tokens, None if p.seed is None else p.seed + j)))
        return seqs

    def _prompts(self, job: GenerateJob) -> list[list[int]] | RayInferError:
        if job.messages is not None:
            if not self.info.has_chat_template:
                return InvalidInput(
                    f"model {self.cfg.name!r} has no chat template; use /v1/completions with a prompt", "model"
                )
            text = self.tokenizer.apply_chat_template(job.messages, tokenize=False, add_generation_prompt=True)
            return [self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        prompts = []
        for i, p in enumerate(job.prompts or []):
            if isinstance(p, str):
                prompts.append(self.tokenizer(p, add_special_tokens=True)["input_ids"])
            elif any(t < 0 or t >= self.vocab_size for t in p):
                return InvalidInput(f"prompt[{i}] has token ids outside [0, {self.vocab_size})", "prompt")
            else:
                prompts.append(list(p))
        return prompts


def _logprobs(c: Any, k: int | None) -> tuple[TokenLogprob, ...] | None:
    """vLLM's per-token logprob dicts (token id → Logprob: the k most likely, and the sampled token
    whatever its rank) as TokenLogprobs."""
    if c.logprobs is None or k is None:
        return None
    out = []
    for token_id, alternatives in zip(c.token_ids, c.logprobs):
        chosen = alternatives[token_id]
        top = sorted(alternatives.values(), key=lambda lp: lp.rank)[:k]
        out.append(
            TokenLogprob(
                chosen.decoded_token or "", chosen.logprob, tuple((lp.decoded_token or "", lp.logprob) for lp in top)
            )
        )
    return tuple(out)
