"""Protocol-independent core: which models exist, their handles, metadata and readiness.

The REST and gRPC adapters call this; it knows nothing of HTTP or gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.schema import ReplicaState

from app.config import AppConfig, ModelConfig
from app.core import deadline as deadlines
from app.core.edge_batch import EdgeBatcher
from app.core.errors import ModelNotFound, ModelNotReady, Overloaded, RayInferError, ReplicaLost
from app.core.metrics import label_model
from deployments.types import EmbedJob, EmbedResult, GenerateChunk, GenerateJob, ModelInfo

logger = logging.getLogger("ray.serve")


def as_rayinfer_error(exc: BaseException) -> BaseException:
    """Unwrap an exception that crossed a handle; map Serve's own failures to ours."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    if isinstance(exc, RayInferError):
        return exc
    if isinstance(exc, BackPressureError):
        # The deployment's backpressure_config.retry_after_s, when serve_config.yaml sets it.
        retry_after = getattr(exc, "retry_after_s", None)
        seconds = 1 if retry_after is None else max(0, math.ceil(retry_after))
        return Overloaded(f"model queue is full, retry shortly ({exc})", retry_after_s=seconds)
    if isinstance(exc, RayActorError):
        return ReplicaLost("the model replica serving this request died; retry")
    return exc


T = TypeVar("T")
REPLICA_POLL_S = 10.0  # how often the edge batchers follow the models' replica counts


def replica_lost(exc: BaseException) -> bool:
    """The model replica died under the request (the request itself did nothing wrong)."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    return isinstance(exc, (RayActorError, ReplicaLost))


class EmbedBackend(Protocol):
    """Where an embedding model runs: its Embedder deployment, or inside this ingress replica."""

    async def embed(self, job: EmbedJob) -> EmbedResult | RayInferError: ...

    async def embed_many(self, jobs: list[EmbedJob]) -> list[EmbedResult | RayInferError]: ...

    async def metadata(self) -> ModelInfo: ...


class HandleBackend:
    """A model in its own deployment, one DeploymentHandle call per job or edge batch."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def embed(self, job: EmbedJob) -> EmbedResult | RayInferError:
        return await self.handle.embed.remote(job)

    async def embed_many(self, jobs: list[EmbedJob]) -> list[EmbedResult | RayInferError]:
        return await self.handle.embed_many.remote(jobs)

    async def metadata(self) -> ModelInfo:
        return await self.handle.metadata.remote()


class ModelRegistry:
    """The served models and how to reach each: a deployment's handle, or (`placement: ingress`) a
    model held by this ingress replica (`local`)."""

    def __init__(
        self, config: AppConfig, handles: dict[str, DeploymentHandle], local: dict[str, EmbedBackend] | None = None
    ):
        self.config = config
        self._models: dict[str, ModelConfig] = {m.name: m for m in config.models}
        self._handles = handles
        self._local = local or {}
        self._info: dict[str, ModelInfo] = {}
        self._embedders: dict[str, EmbedBackend] = {
            name: self._local.get(name) or HandleBackend(handles[name])
            for name, m in self._models.items()
            if m.task == "embed"
        }
        self._batchers: dict[str, EdgeBatcher[EmbedJob, EmbedResult | RayInferError]] = {
            name: EdgeBatcher(
                self._embedders[name].embed_many,
                size_of=len,
                max_items=config.edge_batch_max_items,
                max_inflight=self._inflight_limit(m, replicas=1),
                expired=_expired_at_edge(name),
                min_items=m.edge_min_batch,
            )
            for name, m in self._models.items()
            if m.task == "embed" and config.edge_batching
        }
        self._streams = {
            name: handles[name].options(stream=True) for name, m in self._models.items() if m.task == "generate"
        }
        self._follower: asyncio.Future | None = None  # started with the first embedding (needs the event loop)

    def _inflight_limit(self, m: ModelConfig, replicas: int) -> int:
        """Edge batches out at once: one per batch the model's replicas compute at once, plus one, so
        the next is already gathering where it will run."""
        return m.batches_in_flight * replicas + 1

    def scale_batchers(self, running: dict[str, int]) -> None:
        """Follow the models' RUNNING replica counts (autoscaling adds and removes them)."""
        for name, batcher in self._batchers.items():
            m = self._models[name]
            if m.deployment_name in running:
                replicas = 1 if name in self._local else max(1, running[m.deployment_name])
                batcher.max_inflight = self._inflight_limit(m, replicas)
                batcher.busy_after = replicas  # a batch per replica leaves at once; more wait to fill

    def deadline(self) -> float:
        """Until when (monotonic) a request that loses its replica is retried."""
        return time.monotonic() + self.config.replica_retry_s

    async def retry_lost(self, name: str, exc: BaseException, deadline: float, attempt: int) -> None:
        """Return (after a backoff) if the request may run again; else raise, mapped for the client."""
        delay = min(0.05 * 2**attempt, 1.0)
        if not replica_lost(exc) or time.monotonic() + delay > deadline:
            raise exc
        logger.warning(
            "model %s: replica lost under a request (%s); retry %d in %.2fs",
            name,
            type(exc).__name__,
            attempt + 1,
            delay,
        )
        await asyncio.sleep(delay)  # the router learns of the death and Serve starts a replacement

    async def retrying(self, name: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call()` again on a live or restarted replica while its replica dies, up to replica_retry_s."""
        deadline, attempt = self.deadline(), 0
        while True:
            try:
                return await call()
            except Exception as exc:
                await self.retry_lost(name, exc, deadline, attempt)
                attempt += 1

    async def _follow_replicas(self) -> None:
        """Every REPLICA_POLL_S, scale the edge batchers to the models' RUNNING replicas."""
        while True:
            running = await _running_replicas()
            if running is None:
                return  # not in a Serve replica (unit tests): nothing to follow
            self.scale_batchers(running)
            await asyncio.sleep(REPLICA_POLL_S)

    async def embed(self, name: str, job: EmbedJob) -> EmbedResult | RayInferError:
        """One request's job, through the model's edge batcher when there is one; retried if its replica dies."""
        job = deadlines.with_deadline(job)
        if self._follower is None and self._batchers:
            self._follower = asyncio.ensure_future(self._follow_replicas())
        batcher = self._batchers.get(name)
        use_batcher = batcher is not None and len(job) <= self.config.edge_batch_max_request_items

        async def once() -> EmbedResult | RayInferError:
            if batcher is not None and use_batcher:
                result = await batcher.submit(job)
            else:
                result = await self._embedders[name].embed(job)
            if isinstance(result, ReplicaLost):  # a pipeline stage died under the batch: run it again
                raise result
            return result

        return await self.retrying(name, once)

    async def generate(self, name: str, job: GenerateJob) -> AsyncGenerator[list[GenerateChunk] | RayInferError, None]:
        """Stream the job's chunks from the model's Generator; leaving early cancels the work there.
        A replica lost before the first chunk is retried; after it, the caller gets the error."""
        job = deadlines.with_deadline(job)
        deadline, attempt = self.deadline(), 0
        while True:
            response = self._streams[name].generate.remote(job)
            assert isinstance(response, DeploymentResponseGenerator)  # a stream=True handle's
            started = done = False
            try:
                async for item in response:
                    started = True
                    yield item
                done = True
                return
            except Exception as exc:
                if started:
                    raise
                await self.retry_lost(name, exc, deadline, attempt)
                attempt += 1
            finally:
                if not done:
                    response.cancel()

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def model(self, name: Any, task: str | None) -> ModelConfig:
        """The served model's config; ModelNotFound (404) if no model (of that task, unless None) has that name."""
        cfg = self._models.get(name) if isinstance(name, str) else None
        if cfg is None or task not in (None, cfg.task):
            served = ", ".join(n for n, m in self._models.items() if task in (None, m.task))
            serves = f" or does not serve {task!r}" if task else ""
            raise ModelNotFound(f"The model `{name}` does not exist{serves}; served: {served}", "model")
        label_model(cfg.name)
        return cfg

    async def _metadata(self, name: str) -> ModelInfo:
        if name in self._embedders:
            return await self._embedders[name].metadata()
        return await self._handles[name].metadata.remote()

    async def info(self, name: str, timeout_s: float | None = None) -> ModelInfo:
        if name not in self._info:
            try:  # a timeout cancels the call, and with it the handle's request
                self._info[name] = await asyncio.wait_for(self._metadata(name), timeout_s)
            except asyncio.TimeoutError:
                raise ModelNotReady(f"model {name!r} did not answer within {timeout_s}s") from None
        return self._info[name]

    async def not_ready(self, names: list[str] | None = None) -> dict[str, str]:
        """Models (of `names`, default all) that cannot answer now, with why; empty when all are ready."""
        timeout = self.config.ready_timeout_s
        names = list(self._models) if names is None else names

        async def probe(name: str) -> str | None:
            try:
                await asyncio.wait_for(self._metadata(name), timeout)
                return None
            except asyncio.TimeoutError:
                return f"no answer within {timeout}s"
            except Exception as exc:  # any failure means not ready; report it
                return f"{type(exc).__name__}: {exc}"

        running = await _running_replicas()
        if running is not None:
            self.scale_batchers(running)
        results = await asyncio.gather(*(probe(n) for n in names))
        failing = {n: r for n, r in zip(names, results) if r is not None}
        for name in names:
            deployed = name not in self._local
            if deployed and running is not None and running.get(self._models[name].deployment_name, 0) == 0:
                failing[name] = "no healthy replica"
        if failing:  # say why in the replica's log: a readiness probe only sees a bool or a 503
            logger.warning("not ready: %s", failing)
        return failing


def _expired_at_edge(name: str) -> Callable[[EmbedJob], RayInferError | None]:
    def check(job: EmbedJob) -> RayInferError | None:
        return deadlines.exceeded("edge_batch", name) if deadlines.expired(job.deadline) else None

    return check


async def _running_replicas() -> dict[str, int] | None:
    """RUNNING replicas per deployment of this application, from Serve's controller; None outside Serve."""
    try:
        app = serve.get_replica_context().app_name
        status = await asyncio.to_thread(serve.status)
    except Exception:  # not in a replica (unit tests) or the controller is briefly unreachable
        return None
    deployments = status.applications[app].deployments if app in status.applications else {}
    return {name: d.replica_states.get(ReplicaState.RUNNING, 0) for name, d in deployments.items()}
