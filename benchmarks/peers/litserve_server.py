"""LitServe peer for `make bench` (runs in its own venv, artifacts/peers/litserve): all-MiniLM-L6-v2
through sentence-transformers, LitServe's dynamic batching as its docs recommend, an OpenAI-shaped
/v1/embeddings answer. Never imported by the project.

    artifacts/peers/litserve/bin/python benchmarks/peers/litserve_server.py MODEL_DIR PORT
"""

import sys

import litserve as ls
import torch
from sentence_transformers import SentenceTransformer


class Embeddings(ls.LitAPI):
    def setup(self, device):
        torch.set_num_threads(2)
        self.model = SentenceTransformer(sys.argv[1], device="cpu")

    def decode_request(self, request):
        return request["input"]

    def predict(self, texts):
        return self.model.encode(list(texts), batch_size=len(texts), convert_to_numpy=True)

    def encode_response(self, vector):
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": vector.tolist()}],
            "model": "all-MiniLM-L6-v2",
        }


if __name__ == "__main__":
    api = Embeddings(max_batch_size=32, batch_timeout=0.005, api_path="/v1/embeddings")
    ls.LitServer(api, accelerator="cpu", workers_per_device=1).run(port=int(sys.argv[2]), generate_client_file=False)
