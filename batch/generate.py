"""`python -m batch generate`: prompts or chats through vLLM, the online Generator's engine.

    read (RowsSource) ─► vLLM actor pool ─► write (ResultSink): id, text, finish_reason, token counts

Each actor holds vLLM's offline engine (`vllm.LLM`), built with the very arguments the online
Generator gives vLLM's AsyncLLM (models/vllm_engine.py: `engine_kwargs`, `engine_env`), and hands it a
whole batch of rows at once: vLLM batches and schedules them itself (continuous batching, paged KV
cache). Prompts are prepared as the Generator prepares them: a prompt is tokenized with the special
tokens, a chat goes through the checkpoint's chat template; prompt plus max_tokens over the context
is the Generator's 400 message, recorded in the errors file.

Ray Data's own `ray.data.llm` vLLM processor was not used: its engine stage asks Ray for a GPU per
engine unless given a placement group, and brings its own chat-template and tokenize stages, where
this path reuses the online service's engine arguments and prompt rules.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray.data
from ray.actor import ActorHandle
from ray.data import ActorPoolStrategy

from app.config import ModelConfig
from batch.sources import ERROR, VALUE
from batch.spec import Pool
from models.params import SamplingParams
from models.vllm_engine import engine_env, engine_kwargs, to_vllm

TEXT, FINISH = "text", "finish_reason"
COLUMNS = [TEXT, FINISH, "prompt_tokens", "completion_tokens"]


@dataclass(frozen=True)
class GenerateJob:
    """What the vLLM pool needs (picklable)."""

    cfg: ModelConfig
    path: str  # the checkpoint directory
    id_field: str
    params: SamplingParams


def value_check(value: Any) -> tuple[str | None, str | None]:
    """A prompt (a string) or a chat (a list of {"role", "content"} messages), as JSON for the engine stage."""
    if value is None:
        return None, "missing prompt"
    if isinstance(value, str):
        return json.dumps({"prompt": value}), None
    if isinstance(value, list) and value and all(_message(m) for m in value):
        return json.dumps({"messages": value}), None
    return None, 'prompt: expected a string, or a list of {"role": ..., "content": ...} messages'


def _message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


class VllmPool:
    """An actor holding vLLM's offline engine for the model."""

    def __init__(self, job: GenerateJob, pool: Pool, counter: ActorHandle | None = None):
        from vllm import LLM

        os.environ.update(engine_env(job.cfg))
        kwargs = engine_kwargs(job.cfg, Path(job.path))
        kwargs.pop("enable_log_requests", None)  # AsyncEngineArgs only
        self.job, self.counter = job, counter
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.context = int(self.llm.llm_engine.model_config.max_model_len)

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = batch[ERROR].to_pylist()
        values = batch[VALUE].to_pylist()
        from vllm.inputs import TokensPrompt

        todo: list[int] = []
        prompts: list[TokensPrompt] = []
        params = []
        for i, (value, error) in enumerate(zip(values, errors)):
            if error is not None:
                continue
            prepared = self._prepare(json.loads(value))
            if isinstance(prepared, str):
                errors[i] = prepared
                continue
            todo.append(i)
            prompts.append(TokensPrompt(prompt_token_ids=prepared[0]))
            params.append(prepared[1])
        outs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        rows: dict[str, list[Any]] = {c: [None] * len(errors) for c in COLUMNS}
        for i, out in zip(todo, outs):
            c = out.outputs[0]
            rows[TEXT][i], rows[FINISH][i] = c.text, c.finish_reason or "stop"
            rows["prompt_tokens"][i], rows["completion_tokens"][i] = len(out.prompt_token_ids or ()), len(c.token_ids)
        if self.counter is not None:
            self.counter.add.remote(batch.num_rows)
        return pa.table(
            {self.job.id_field: batch[self.job.id_field], **rows, ERROR: pa.array(errors, pa.string())},
            schema=_schema(batch.schema.field(self.job.id_field)),
        )

    def _prepare(self, value: dict) -> tuple[list[int], Any] | str:
        """Token ids and vLLM's sampling params, or the error, as the online Generator decides them."""
        if "messages" in value:
            if not getattr(self.tokenizer, "chat_template", None):
                return f"model {self.job.cfg.name!r} has no chat template; give a prompt"
            text = str(
                self.tokenizer.apply_chat_template(value["messages"], tokenize=False, add_generation_prompt=True)
            )
            ids, field = self.tokenizer(text, add_special_tokens=False)["input_ids"], "messages"
        else:
            ids, field = self.tokenizer(value["prompt"], add_special_tokens=True)["input_ids"], "prompt"
        if not ids:
            return "prompt is empty after tokenization"
        p = self.job.params
        max_tokens = p.max_tokens or self.context - len(ids)
        if len(ids) + max_tokens > self.context:
            return (
                f"This model's maximum context length is {self.context} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the {field}, {max_tokens} for the completion). "
                f"Reduce the length of the {field} or max_tokens."
            )
        from vllm.sampling_params import RequestOutputKind

        sampling = to_vllm(p, max_tokens)
        sampling.output_kind = RequestOutputKind.FINAL_ONLY  # whole texts, not the online stream's deltas
        return ids, sampling


def _schema(id_field: pa.Field) -> pa.Schema:
    return pa.schema(
        [
            id_field,
            (TEXT, pa.string()),
            (FINISH, pa.string()),
            ("prompt_tokens", pa.int64()),
            ("completion_tokens", pa.int64()),
            (ERROR, pa.string()),
        ]
    )


def build(
    ds: ray.data.Dataset,
    job: GenerateJob,
    pool: Pool,
    concurrency: tuple[int, int],
    batch_size: int,
    counter: ActorHandle | None = None,
) -> ray.data.Dataset:
    """Append the vLLM actor pool to `ds`."""
    env = {**pool.env, **engine_env(job.cfg)}
    return ds.map_batches(
        VllmPool,
        fn_constructor_args=(job, pool, counter),
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1]),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None,
        runtime_env={"env_vars": env} if env else None,
    )
