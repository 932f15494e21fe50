"""The Generator deployment: one replica holds one causal LM and decodes its requests together.

A dedicated thread runs the continuous-batching engine (`models/generation.py`); requests
join and leave between its decode steps. Each request is an async generator on the
replica's event loop, fed through an asyncio queue; whatever piled up since its last yield
leaves as one chunk list, so a busy replica sends fewer, larger messages.

A request whose caller goes away (client disconnect, cancelled handle call) aborts its
sequences before the next decode step: no tokens are generated for nobody.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import torch
from ray import serve

from app.config import ModelConfig
from app.core import metrics
from app.core.errors import InputTooLong, InvalidInput, RayInferError, ReplicaLost
from deployments.replica import replica_device, replica_threads
from deployments.stage import RemoteRunner
from deployments.types import GenerateChunk, GenerateJob, ModelInfo
from models.causal_lm import CausalLM
from models.generation import Engine, StepOutput
from models.loader import resolve_source
from models.params import SamplingParams

logger = logging.getLogger("ray.serve")


# max_ongoing_requests comes from the model config (app/main.py: enough for a full batch and the next).
@serve.deployment(ray_actor_options={"num_cpus": 1}, health_check_period_s=10)
class Generator:
    """Completions with continuous batching; streams chunks or returns whole choices."""

    def __init__(self, cfg: ModelConfig, stages: list | None = None):
        """stages: the handles of the model's Stage deployments, in order, when it is split."""
        torch.set_num_threads(replica_threads(cfg))
        self.cfg = cfg
        root = resolve_source(cfg.source)
        self.lm = CausalLM(root, device=replica_device(cfg), dtype=cfg.dtype, weights=not stages)
        self.context = min(cfg.max_input_tokens or self.lm.max_context, self.lm.max_context)
        runners = [RemoteRunner(h) for h in stages] if stages else None
        self.engine = Engine(
            self.lm,
            max_batch_size=cfg.max_batch_size,
            max_batch_tokens=cfg.max_batch_tokens,
            runners=runners,
            microbatches=cfg.microbatches,
        )
        self.info = ModelInfo(
            name=cfg.name,
            task=cfg.task,
            root=str(root),
            dim=None,
            max_input_tokens=self.context,
            vocab_size=self.lm.vocab_size,
            has_chat_template=self.lm.has_chat_template,
        )
        self._queues: dict[str, asyncio.Queue[StepOutput]] = {}
        self._wake = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats = {"tokens": 0, "steps": 0, "max_running": 0}
        self._metrics = metrics.model()
        self._tags = metrics.phase_tags(cfg.name, ("tokenize", "first_token", "step"))
        self._engine_thread = threading.Thread(target=self._run_engine, name="engine", daemon=True)
        self._engine_thread.start()
        logger.info("Generator %s loaded from %s on %s, context %d", cfg.name, root, self.lm.device, self.context)

    async def metadata(self) -> ModelInfo:
        return self.info

    async def check_health(self) -> None:
        """Serve's health check: the engine thread is alive and a real one-token forward gives finite logits.

        The forward runs beside the engine (not queued behind a full batch), so a busy replica stays healthy.
        """
        if not self._engine_thread.is_alive():
            raise RuntimeError("the decoding engine thread has died")
        if self.lm.model is None:  # a pipeline's driver holds no weights; its stages are checked by Serve
            return
        logits = await asyncio.to_thread(self._probe_forward)
        if not torch.isfinite(logits).all():
            raise RuntimeError("the model's forward pass gives non-finite logits")

    def _probe_forward(self) -> torch.Tensor:
        with torch.inference_mode():
            ids = torch.tensor([self.lm.encode("ok")[-1:]], device=self.lm.device)
            assert self.lm.model is not None  # probed only when this replica holds the weights
            return self.lm.model(input_ids=ids, use_cache=False).logits[0, -1]

    async def stats(self) -> dict[str, int]:
        """Running and waiting sequences, tokens generated, decode steps, the most run at once."""
        return {**self._stats, "running": self.engine.running, "waiting": self.engine.waiting}

    async def generate(self, job: GenerateJob) -> AsyncIterator[list[GenerateChunk] | RayInferError]:
        """Stream the job's chunks; a client error is the first and only item, as a value."""
        self._loop = asyncio.get_running_loop()
        arrived = time.perf_counter()
        seqs = self._prepare(job)
        self._metrics.phase.observe(time.perf_counter() - arrived, self._tags["tokenize"])
        if isinstance(seqs, RayInferError):
            yield seqs
            return
        queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        rid = uuid.uuid4().hex
        ids = {f"{rid}:{i}": i for i in range(len(seqs))}
        for seq_id, (prompt, params) in zip(ids, seqs):
            self._queues[seq_id] = queue
            self.engine.add(seq_id, prompt, params)
        self._metrics.input_tokens.inc(sum(len(p) for p, _ in seqs), self._tags["model"])
        self._wake.set()
        running = set(ids)
        first = True
        last_yield = 0.0  # the first chunk leaves at once: time to first token is not delayed
        try:
            while running:
                outs = [await queue.get()]
                # Tokens arriving within stream_interval_s of the last chunk ride with the next one:
                # fewer, larger messages through the handle, the ingress and the client.
                wait = last_yield + self.cfg.stream_interval_s - self._loop.time()
                if wait > 0 and outs[0].finish_reason is None:
                    await asyncio.sleep(wait)
                while not queue.empty():
                    outs.append(queue.get_nowait())
                chunks = []
                if first:  # arrival at the replica to the first token: waiting, admission, prefill
                    self._metrics.phase.observe(time.perf_counter() - arrived, self._tags["first_token"])
                    first = False
                for out in outs:
                    if out.finish_reason == "error":
                        yield ReplicaLost("generation failed on the replica; retry")
                        return
                    if out.finish_reason is not None:
                        running.discard(out.seq_id)
                    chunks.append(
                        GenerateChunk(
                            ids[out.seq_id], out.text, out.finish_reason, out.prompt_tokens, out.completion_tokens
                        )
                    )
                yield chunks
                last_yield = self._loop.time()
        finally:
            for seq_id in running:  # the caller left early: free the slots now
                self.engine.abort(seq_id)
            self._wake.set()
            for seq_id in ids:
                self._queues.pop(seq_id, None)

    def _prepare(self, job: GenerateJob) -> list[tuple[list[int], SamplingParams]] | RayInferError:
        """Token ids and sampling params per sequence, or the client error the job deserves."""
        if job.messages is not None:
            if not self.lm.has_chat_template:
                return InvalidInput(
                    f"model {self.cfg.name!r} has no chat template; use /v1/completions with a prompt", "model"
                )
            prompts, field = [self.lm.chat_ids(job.messages)], "messages"
        else:
            prompts, field = [], "prompt"
            for i, p in enumerate(job.prompts or []):
                if isinstance(p, str):
                    prompts.append(self.lm.encode(p))
                elif any(t < 0 or t >= self.lm.vocab_size for t in p):
                    return InvalidInput(f"prompt[{i}] has token ids outside [0, {self.lm.vocab_size})", "prompt")
                else:
                    prompts.append(list(p))
        seqs = []
        for prompt in prompts:
            if not prompt:
                return InvalidInput("prompt is empty after tokenization", field)
            max_tokens = job.params.max_tokens or self.context - len(prompt)
            if len(prompt) + max_tokens > self.context:
                return InputTooLong(
                    f"This model's maximum context length is {self.context} tokens. However, you requested "
                    f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the {field}, {max_tokens} for the "
                    f"completion). Reduce the length of the {field} or max_tokens.",
                    "max_tokens" if len(prompt) < self.context else field,
                )
            for j in range(job.n):
                seed = None if job.params.seed is None else job.params.seed + j
                seqs.append((prompt, replace(job.params, max_tokens=max_tokens, seed=seed)))
        return seqs

    def _run_engine(self) -> None:
        last_step: dict[int, float] = {}  # by micro-batch group: its sequences' tokens come once per turn
        while True:
            self._wake.clear()
            if not self.engine.has_work():
                self._wake.wait()
                last_step.clear()
                continue
            try:
                start, group = time.perf_counter(), self.engine.turn
                outputs = self.engine.step()
                self._record_step(outputs, start, last_step.get(group))
                last_step[group] = start
            except Exception:  # a bug or a device failure: fail the batch, keep serving
                logger.exception("decode step failed; failing the running sequences")
                outputs = [StepOutput(seq_id, "", None, "error") for seq_id in self.engine.drop_all()]
            self._stats["steps"] += 1
            self._stats["tokens"] += sum(1 for o in outputs if o.token_id is not None)
            self._stats["max_running"] = max(self._stats["max_running"], len(outputs))
            if outputs and self._loop is not None:
                self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _record_step(self, outputs: list[StepOutput], start: float, last_step: float | None) -> None:
        m, model_tag = self._metrics, self._tags["model"]
        m.phase.observe(time.perf_counter() - start, self._tags["step"])
        if last_step is not None:
            m.itl.observe(start - last_step, model_tag)
        if outputs:
            m.batch_size.observe(len(outputs), model_tag)
            m.output_tokens.inc(len(outputs), model_tag)

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.seq_id)
            if queue is not None:
                queue.put_nowait(out)
