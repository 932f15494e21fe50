"""vLLM's per-step engine statistics turned into rayinfer's metrics (a vLLM stat logger).

vLLM calls `record` in the replica's process after each engine step with the step's scheduler and
iteration stats: time to first token and inter-token latencies as the engine measured them, tokens
in and out, and how many sequences ran together (the batch size).
"""

from __future__ import annotations

import functools
from typing import Any

from app.core import metrics


class EngineStats:
    """Counters for `Generator.stats()` and the Prometheus metrics, fed by vLLM's stat logger calls."""

    def __init__(self, model_name: str):
        self.counts = {"steps": 0, "tokens": 0, "running": 0, "waiting": 0, "max_running": 0}
        self._metrics = metrics.model()
        self._tags = metrics.phase_tags(model_name, ("first_token",))

    def factory(self, vllm_config: Any, engine_index: int = 0) -> Any:
        """vLLM's StatLoggerFactory signature: one logger per engine, all recording here."""
        return _stat_logger_class()(self)

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        m, model = self._metrics, self._tags["model"]
        c = self.counts
        if scheduler_stats is not None:
            c["running"], c["waiting"] = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
            c["max_running"] = max(c["max_running"], c["running"])
        if iteration_stats is None:
            return
        generated = iteration_stats.num_generation_tokens
        c["steps"] += 1
        c["tokens"] += generated
        if generated:
            m.output_tokens.inc(generated, model)
            m.batch_size.observe(max(c["running"], 1), model)
        if iteration_stats.num_prompt_tokens:
            m.input_tokens.inc(iteration_stats.num_prompt_tokens, model)
        for ttft in iteration_stats.time_to_first_tokens_iter:
            m.phase.observe(ttft, self._tags["first_token"])
        for itl in iteration_stats.inter_token_latencies_iter:
            m.itl.observe(itl, model)


@functools.cache
def _stat_logger_class() -> type:
    """vLLM's StatLoggerBase subclass, made on first use: importing vLLM is slow, and the ingress
    (which imports this module's deployment) never needs it."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class StatLogger(StatLoggerBase):
        """Forwards vLLM's per-step stats to an EngineStats."""

        def __init__(self, sink: EngineStats):
            self.sink = sink

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            self.sink.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return StatLogger
