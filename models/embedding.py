"""Sentence embeddings computed exactly as sentence-transformers computes them.

Reads the checkpoint's sentence-transformers files (`modules.json`, `1_Pooling/config.json`,
`sentence_bert_config.json`) for the pooling mode, normalisation and sequence limit, and
falls back to mean pooling + L2 normalisation for a bare transformers checkpoint.

The encoder runs as a chain of `EncoderStage`s: one holding the whole model, or a pipeline's
stages (models/encoder_stages.py), each passing the next its hidden states with their mask.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.fast_tokens import single_threaded, truncate_ids

NORMALIZE_MODULE = "sentence_transformers.models.Normalize"


@dataclass(frozen=True)
class PoolingSpec:
    mode: str  # "mean" | "cls" | "max"
    normalize: bool
    max_seq_length: int | None


def read_pooling_spec(path: Path) -> PoolingSpec:
    """Pooling as the checkpoint's sentence-transformers config says."""
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return PoolingSpec(mode="mean", normalize=True, max_seq_length=None)
    modules = json.loads(modules_file.read_text())
    normalize = any(m.get("type") == NORMALIZE_MODULE for m in modules)
    mode = "mean"
    pooling = next((m for m in modules if m.get("type", "").endswith(".Pooling")), None)
    if pooling is not None:
        cfg = json.loads((path / pooling["path"] / "config.json").read_text())
        if cfg.get("pooling_mode_cls_token"):
            mode = "cls"
        elif cfg.get("pooling_mode_max_tokens"):
            mode = "max"
    max_seq_length = None
    st_cfg = path / "sentence_bert_config.json"
    if st_cfg.exists():
        max_seq_length = json.loads(st_cfg.read_text()).get("max_seq_length")
    return PoolingSpec(mode=mode, normalize=normalize, max_seq_length=max_seq_length)


def pool(hidden: torch.Tensor, mask: torch.Tensor, spec: PoolingSpec) -> torch.Tensor:
    """Pool token states [B, T, H] with attention mask [B, T] into [B, H]."""
    if spec.mode == "cls":
        out = hidden[:, 0]
    elif spec.mode == "max":
        out = hidden.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min).max(dim=1).values
    else:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        out = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
    return F.normalize(out, p=2, dim=1) if spec.normalize else out


class LastHiddenState(torch.nn.Module):
    """The encoder as ONNX Runtime and TorchScript take it: ids and mask in, token states out (pooling
    stays in Python, shared by every runtime)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@dataclass
class Hidden:
    """What crosses from one encoder stage to the next: token states and the mask that belongs to them."""

    states: torch.Tensor  # into the first stage: token ids [B, T]; between stages: hidden states [B, T, H]
    mask: torch.Tensor  # [B, T]: 1 for a token, 0 for padding


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX), where torch's bf16 matmuls
    (oneDNN) run about twice as fast as its float32 ones; elsewhere bfloat16 is emulated and slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_runtime(runtime: str, autocast: str | None, device: torch.device) -> tuple[str, str | None]:
    """(runtime, autocast) as the model will run here. `auto`: on a CPU with native bfloat16, torch with its
    matmuls in bfloat16 (cosine >= 0.9999 to float32 on tests/helpers.varied_texts; raw limit 3.5x ONNX
    Runtime's float32 on a 2-core Xeon with AMX, BENCHMARKS.md); on other CPUs ONNX Runtime in float32 (the
    fastest float32 measured); on a GPU torch (its dtype is the config's)."""
    if runtime != "auto":
        return runtime, autocast
    if device.type != "cpu":
        return "torch", None
    return ("torch", "bfloat16") if native_bf16() else ("onnx", None)


class EncoderStage:
    """An encoder's layers [start, end), or all of them, called on a `Hidden` batch.

    The first stage (`first`) takes token ids, the others hidden states; the last (`last`) pools.
    models/encoder_stages.py loads a stage of a checkpoint. `autocast`: a dtype the matmuls run in
    under torch.autocast (weights, layer norms, softmax and pooling stay float32).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        spec: PoolingSpec,
        device: torch.device,
        first: bool,
        last: bool,
        autocast: str | None = None,
    ):
        self.model, self.spec, self.device, self.first, self.last = model, spec, device, first, last
        self.autocast = autocast

    @torch.inference_mode()
    def __call__(self, x: Hidden) -> Hidden | torch.Tensor:
        """The next stage's input, or from the last stage the pooled vectors (float32 [B, H], on the CPU)."""
        mask = x.mask.to(self.device)
        states = x.states.to(self.device)
        inputs = {"input_ids": states} if self.first else {"inputs_embeds": states}
        # autocast's state is per thread: entered here, on the thread that computes the batch
        dtype = getattr(torch, self.autocast) if self.autocast else None
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            hidden = self.model(**inputs, attention_mask=mask).last_hidden_state
        if self.last:
            return pool(hidden.float(), mask, self.spec).cpu()
        return Hidden(hidden, x.mask)


TRACES = Path(__file__).resolve().parents[1] / "artifacts" / "traced"


def weights_key(checkpoint: Path, *extra: str) -> str:
    """A cache key for what is derived from a checkpoint's weights: their identity (path, size, modification
    time) and `extra` (what else the derived file depends on)."""
    weights = sorted(p for p in checkpoint.iterdir() if p.suffix in (".safetensors", ".bin"))
    identity = "|".join([*(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in weights), *extra])
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def save_atomic(target: Path, write: Callable[[Path], object]) -> Path:
    """`write(path)` into a temporary file beside `target`, then renamed onto it: a concurrent reader (another
    replica, another actor) sees the whole file or none."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        path = Path(tmp) / target.name
        write(path)
        os.replace(path, target)
    return target


class TracedEncoder:
    """The whole encoder with its matmuls in `autocast`'s dtype, as a frozen TorchScript trace, on the CPU:
    called like an `EncoderStage` holding the whole model. Eager, each of the forward's few hundred torch
    calls takes the GIL, and beside a serving event loop the cores idled waiting for it (the ingress
    replica: 18% of the machine idle on single texts, 0.6x the raw limit on 32-text requests); the trace
    runs the graph in C++, and here computed the same vectors at 1.6-1.9x eager's texts/s. The graph holds
    no shape, so every batch size and length takes it (ids of [2, 8] in; checked on 1 to 64 texts of 1 to
    256 tokens: tests/unit/test_colocated.py). Traced once per checkpoint, torch and transformers version
    and dtype, cached in artifacts/traced/ (`load`): a process that finds the file loads the graph without
    transformers or the eager model (the batch job's model actor: ~3 s sooner to its first batch). Turns off
    TorchScript's own autocast pass for the process (it would redo the casts the graph holds)."""

    first = last = True

    def __init__(self, graph: torch.jit.ScriptModule, spec: PoolingSpec):
        torch._C._jit_set_autocast_mode(False)
        self.graph, self.spec = graph, spec

    @staticmethod
    def trace(model: torch.nn.Module, autocast: str) -> torch.jit.ScriptModule:
        """`model`'s last hidden state as a frozen trace under torch.autocast(`autocast`)."""
        ids = torch.ones((2, 8), dtype=torch.long)
        torch._C._jit_set_autocast_mode(False)
        with torch.inference_mode(), torch.autocast("cpu", dtype=getattr(torch, autocast)), warnings.catch_warnings():
            # transformers' mask code reads two shapes in Python (is the mask narrower than the ids; is it
            # causal): the trace fixes them as they are for every batch here (the mask is the ids' width).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(LastHiddenState(model).eval(), (ids, torch.ones_like(ids)), check_trace=False)
            return torch.jit.freeze(traced)

    @classmethod
    def load(cls, checkpoint: Path, spec: PoolingSpec, autocast: str, cache: Path = TRACES) -> TracedEncoder:
        """The checkpoint's trace from the cache, traced from transformers' model and saved there first if absent."""
        # transformers' model code is what was traced: its version is part of the key, read without importing it
        versions = (torch.__version__, importlib.metadata.version("transformers"), autocast)
        target = cache / weights_key(checkpoint, *versions) / "encoder.pt"
        if target.exists():
            try:
                return cls(torch.jit.load(str(target), map_location="cpu"), spec)
            except RuntimeError:  # unreadable (written by a torch build the key does not tell apart): trace again
                pass
        graph = cls.trace(_auto("AutoModel").from_pretrained(checkpoint).eval(), autocast)
        save_atomic(target, lambda path: torch.jit.save(graph, str(path)))
        return cls(graph, spec)

    @torch.inference_mode()
    def __call__(self, x: Hidden) -> torch.Tensor:
        # The graph as traced: no shape-specialising passes (every batch has its own shape).
        with torch.jit.optimized_execution(False):
            hidden = self.graph(x.states, x.mask)
        return pool(hidden.float(), x.mask, self.spec)


def _auto(name: str) -> Any:
    """transformers' Auto class `name`, imported when first needed: importing transformers took ~7 s
    of CPU here, which a process that only computes token ids it is given (the batch job's model
    actor, with tokenizer=False on ONNX Runtime) does without."""
    import transformers

    return getattr(transformers, name)


def _config(path: Path, raw: bool) -> Any:
    """The checkpoint's config: config.json itself (a dict) where `raw` and it has the sizes this code
    reads, else transformers' AutoConfig (its defaults and aliases fill what the file leaves out)."""
    file = path / "config.json"
    if raw and file.is_file():
        config = json.loads(file.read_text())
        if {"hidden_size", "vocab_size"} <= config.keys():
            return config
    return _auto("AutoConfig").from_pretrained(path)


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


class EmbeddingModel:
    """A tokenizer over a chain of encoder stages: the whole model as one stage, or a pipeline's stages.

    weights=False: tokenizer and config only, for a pipeline's driver (the weights live in its
    stages); `stages`: in-process stages to run instead of the whole model. runtime: `torch`
    (transformers' forward, its matmuls in `autocast`'s dtype if given) or `onnx` (the same model exported
    to ONNX Runtime, models/onnx_encoder.py), or `auto` (`resolve_runtime`: the fastest of those on this
    machine; `self.runtime` and `self.autocast` say which), with `threads` intra-op threads per batch
    (torch's are process-wide: the caller sets them).
    """

    def __init__(
        self,
        path: Path,
        device: str = "cpu",
        max_input_tokens: int | None = None,
        weights: bool = True,
        stages: list[Callable[[Hidden], Hidden | torch.Tensor]] | None = None,
        runtime: str = "torch",
        threads: int = 1,
        dtype: str = "float32",
        tokenizer: bool = True,
        autocast: str | None = None,
    ):
        self.path = Path(path)
        self.device = torch.device(device)
        self.runtime, self.autocast = resolve_runtime(runtime, autocast, self.device)
        self.spec = read_pooling_spec(self.path)
        if tokenizer:
            single_threaded()  # the tokenizer's thread pool would compete with the model for the cores
        self.tokenizer = _auto("AutoTokenizer").from_pretrained(self.path) if tokenizer else None
        self.model = None
        if weights and not stages and self.runtime == "onnx":
            from models.onnx_encoder import OnnxEncoder  # imports this module: loaded only when asked for

            stages = [OnnxEncoder(self.path, self.spec, threads)]
        elif weights and not stages and self.autocast and self.device.type == "cpu":
            stages = [TracedEncoder.load(self.path, self.spec, self.autocast)]
        elif weights and not stages:
            weights_dtype = getattr(torch, dtype)  # float32, bfloat16, float16; pooling is in float32
            self.model = _auto("AutoModel").from_pretrained(self.path, dtype=weights_dtype).to(self.device).eval()
        whole: list[Callable[[Hidden], Hidden | torch.Tensor]] = []
        if self.model is not None:
            whole = [EncoderStage(self.model, self.spec, self.device, True, True, self.autocast)]
        self.stages = stages or whole
        config = self.model.config if self.model is not None else _config(self.path, self.tokenizer is None)
        model_limit = _get(config, "max_position_embeddings") or 512
        self.max_tokens = min(x for x in (max_input_tokens, self.spec.max_seq_length, model_limit) if x)
        self.dim = int(_get(config, "hidden_size"))
        self.vocab_size = len(self.tokenizer) if self.tokenizer is not None else int(_get(config, "vocab_size"))
        # Padding is masked: the id only fills the tensor (without a tokenizer: the config's).
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else _get(config, "pad_token_id")
        self.pad_id = pad or 0

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with special tokens, untruncated (limits are the caller's call)."""
        return self._tokenizer()(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]

    @property
    def keep_last(self) -> bool:
        """Whether truncation keeps the final token: the tokenizer adds a closing special token."""
        return bool(self._tokenizer().num_special_tokens_to_add(pair=False) >= 2)

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise RuntimeError("this EmbeddingModel was loaded without its tokenizer (tokenizer=False)")
        return self.tokenizer

    def truncate(self, ids: list[int]) -> list[int]:
        """Cut to the limit keeping the final special token, as the tokenizer's truncation does."""
        return truncate_ids(ids, self.max_tokens, self.keep_last)

    def padded(self, batch: list[list[int]], chunk_size: int = 64) -> Iterator[tuple[list[int], Hidden]]:
        """The batch sorted by length in chunks, each padded to its longest: (positions in `batch`, ids and mask).

        Short texts do not pay for long ones; padding is masked, so a text's vector does not depend
        on its chunk mates.
        """
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        for start in range(0, len(order), chunk_size):
            idx = order[start : start + chunk_size]
            width = max(len(batch[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(batch[i])] = torch.tensor(batch[i], dtype=torch.long)
                mask[row, : len(batch[i])] = 1
            yield idx, Hidden(ids, mask)

    @torch.inference_mode()
    def embed_ids(self, batch: list[list[int]], chunk_size: int = 64) -> np.ndarray:
        """Embed token-id sequences through the stages in turn; float32 [len(batch), dim] in input order."""
        out = np.empty((len(batch), self.dim), dtype=np.float32)
        for idx, hidden in self.padded(batch, chunk_size):
            x: Hidden | torch.Tensor = hidden
            for stage in self.stages:
                assert isinstance(x, Hidden)  # only the last stage pools
                x = stage(x)
            assert isinstance(x, torch.Tensor)
            out[idx] = x.numpy()
        return out
