"""The embedding model's raw throughput on a GPU, in-process (no server): texts/s by weight dtype and
batch size, for BENCHMARKS.md's GPU section. Needs CUDA; no Ray.

    python -m benchmarks.gpu_embed [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from loadtest.scenarios import sentence
from models.embedding import EmbeddingModel
from models.loader import resolve_source


def texts_per_s(model: EmbeddingModel, ids: list[list[int]], batch: int, seconds: float) -> float:
    model.embed_ids(ids[:batch], batch)
    torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        at = (n * batch) % (len(ids) - batch)
        model.embed_ids(ids[at : at + batch], batch)  # returns numpy: synchronised
        n += 1
    return n * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    path = resolve_source("bundled:all-MiniLM-L6-v2")
    ids = EmbeddingModel(path, weights=False).tokenize([sentence(i) for i in range(8192)])
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for dtype in ("float32", "bfloat16", "float16"):
        model = EmbeddingModel(path, device="cuda", dtype=dtype)
        for batch in (32, 256, 1024):
            rate = texts_per_s(model, ids, batch, args.seconds)
            results["rows"].append({"dtype": dtype, "batch": batch, "texts_per_s": round(rate)})
            print(json.dumps(results["rows"][-1]), flush=True)
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
