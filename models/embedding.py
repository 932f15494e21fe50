"""Sentence embeddings computed exactly as sentence-transformers computes them.

Reads the checkpoint's sentence-transformers files (`modules.json`, `1_Pooling/config.json`,
`sentence_bert_config.json`) for the pooling mode, normalisation and sequence limit, and
falls back to mean pooling + L2 normalisation for a bare transformers checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

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


class EmbeddingModel:
    """A transformers encoder plus sentence-transformers pooling."""

    def __init__(self, path: Path, device: str = "cpu", max_input_tokens: int | None = None):
        self.path = Path(path)
        self.device = torch.device(device)
        self.spec = read_pooling_spec(self.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(self.device).eval()
        model_limit = getattr(self.model.config, "max_position_embeddings", None) or 512
        self.max_tokens = min(x for x in (max_input_tokens, self.spec.max_seq_length, model_limit) if x)
        self.dim = int(self.model.config.hidden_size)
        self.vocab_size = len(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id or 0

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with special tokens, untruncated (limits are the caller's call)."""
        return self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]

    def truncate(self, ids: list[int]) -> list[int]:
        """Cut to the limit keeping the final special token, as the tokenizer's truncation does."""
        if len(ids) <= self.max_tokens:
            return ids
        n_special = self.tokenizer.num_special_tokens_to_add(pair=False)
        tail = ids[-1:] if n_special >= 2 else []
        return ids[: self.max_tokens - len(tail)] + tail

    @torch.inference_mode()
    def embed_ids(self, batch: list[list[int]], chunk_size: int = 64) -> np.ndarray:
        """Embed token-id sequences; returns float32 [len(batch), dim] in input order.

        Sorted by length and padded per chunk so short texts do not pay for long ones.
        Results do not depend on what else is in the batch (padding is masked out).
        """
        out = np.empty((len(batch), self.dim), dtype=np.float32)
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        for start in range(0, len(order), chunk_size):
            idx = order[start : start + chunk_size]
            width = max(len(batch[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(batch[i])] = torch.tensor(batch[i], dtype=torch.long)
                mask[row, : len(batch[i])] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            out[idx] = pool(hidden.float(), mask, self.spec).cpu().numpy()
        return out
