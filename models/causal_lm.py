"""A causal LM loaded through transformers' Auto classes: GPT-2, Llama, Qwen families, tiny-lm."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CausalLM:
    def __init__(self, path: Path, device: str = "cpu", dtype: str = "float32", weights: bool = True):
        """weights=False: tokenizer and config only (the weights live in pipeline stages)."""
        self.path = Path(path)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = None
        if weights:
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=DTYPES[dtype])
            self.model = torch.nn.Module.to(model, self.device).eval()
        cfg = self.model.config if self.model is not None else AutoConfig.from_pretrained(self.path)
        self.max_context = int(
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1024
        )
        eos = cfg.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.vocab_size = int(cfg.vocab_size)
        self.num_layers = int(cfg.num_hidden_layers)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))
