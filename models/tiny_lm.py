"""Build `tiny-lm`: a small causal LM made here, since no model can be downloaded.

A byte-level BPE tokenizer trained on `models/data/tiny_corpus.txt`, and a 4-layer Llama-architecture
model initialised with a fixed seed and trained for a few steps on the same text, saved with
safetensors. Its text is not meaningful; it exists so generation, streaming and the pipeline
split are tested through the same loading code as any real checkpoint.

    python -m models.tiny_lm [DIR]      # default: artifacts/models/tiny-lm; no-op if built
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "artifacts" / "models" / "tiny-lm"
CORPUS = Path(__file__).with_name("data") / "tiny_corpus.txt"
SEED = 0
TRAIN_STEPS = 60
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def build_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [CORPUS.read_text()], vocab_size=512, min_frequency=1, special_tokens=SPECIAL, show_progress=False
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return tok


def build(out: Path = DEFAULT_DIR) -> Path:
    """Write the checkpoint into `out` (deterministic for a given torch build) and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")],  # type: ignore[list-item]
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    _train(model, tok)
    model.eval().save_pretrained(out, safe_serialization=True)
    (out / "rayinfer_build.json").write_text(json.dumps({"seed": SEED, "train_steps": TRAIN_STEPS}))
    return out


def _train(model: torch.nn.Module, tok: PreTrainedTokenizerFast) -> None:
    """A few steps on the corpus, so greedy text resembles it; weights stay essentially arbitrary."""
    import torch

    ids = torch.tensor(tok(CORPUS.read_text())["input_ids"])
    windows = ids[: len(ids) // 64 * 64].view(-1, 64)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(TRAIN_STEPS):
        batch = windows[torch.arange(step * 4, step * 4 + 4) % len(windows)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optim.step()
        optim.zero_grad()


def ensure(out: Path = DEFAULT_DIR) -> Path:
    """The built checkpoint, building it first if it is missing.

    Built in a temporary directory and renamed into place, so replicas starting together
    never load a half-written checkpoint.
    """
    out = Path(out)
    if not (out / "model.safetensors").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            build(Path(tmp) / "model")
            try:
                os.rename(Path(tmp) / "model", out)
            except OSError:  # another process finished first
                if not (out / "model.safetensors").exists():
                    raise
    return out.resolve()


if __name__ == "__main__":
    print(ensure(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR))
