"""The naive peer `make bench` compares against: what a user would write instead of rayinfer.

One FastAPI/uvicorn process; the same model code, called once per request from FastAPI's
thread pool. No batching across requests.

    python -m benchmarks.naive_peer PORT
"""

from __future__ import annotations

import os
import sys

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from models.embedding import EmbeddingModel
from models.loader import resolve_source

torch.set_num_threads(os.cpu_count() or 1)
model = EmbeddingModel(resolve_source("bundled:all-MiniLM-L6-v2"))
app = FastAPI()


class Request(BaseModel):
    model: str
    input: str | list[str]


@app.post("/v1/embeddings")
def embeddings(req: Request) -> dict:
    texts = [req.input] if isinstance(req.input, str) else req.input
    vectors = model.embed_ids(model.tokenize(texts))
    data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": req.model}


@app.get("/readyz")
def readyz() -> dict:
    return {"status": "ready"}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
