"""NVIDIA's own Triton clients, `tritonclient.http` and `tritonclient.grpc`, with their default settings
against the session's service: health, metadata and inference as a Triton user calls them, from a
program of their own (tests/integration/triton_calls.py says why). Over HTTP the defaults use Triton's
binary tensor data extension (raw tensor bytes after the JSON, both ways); `binary_data=False` sends
and asks for JSON tensors. Vectors must equal /v1/embeddings' within 1e-6, texts /v1/completions'."""

from __future__ import annotations

import json
import subprocess
import sys
from urllib.parse import urlparse

import numpy as np
import pytest

from tests.harness import ROOT
from tests.helpers import MODEL
from tests.integration.triton_calls import GREEDY, PROMPTS, TEXTS

LM = "SmolLM2-135M-Instruct"
SIGNATURES = {
    MODEL: ([("text", "BYTES", [-1])], [("embedding", "FP32", [-1, 384])]),
    LM: ([("text_input", "BYTES", [-1])], [("text_output", "BYTES", [-1]), ("finish_reason", "BYTES", [-1])]),
}


@pytest.fixture(scope="module", params=["http", "grpc"])
def triton(request, served) -> tuple[str, dict]:
    """(wire, what the client program got)."""
    wire = request.param
    url = urlparse(served[0]).netloc if wire == "http" else served[1]  # "host:port", as Triton's docs write it
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.triton_calls", wire, url, MODEL, LM],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return wire, json.loads(done.stdout)


def test_live_ready_and_server_metadata(triton):
    _, got = triton
    assert got["live"] and got["ready"]
    assert got["server"]["name"] == "rayinfer" and "binary_tensor_data" in got["server"]["extensions"]


@pytest.mark.parametrize("model", [MODEL, LM])
def test_model_ready_and_metadata(triton, model):
    _, got = triton
    assert got["models"][model]["ready"]
    meta = got["models"][model]["metadata"]
    shapes = [
        [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta[side]] for side in ("inputs", "outputs")
    ]
    assert tuple(shapes) == SIGNATURES[model]


@pytest.mark.parametrize("form", ["default", "json"])
def test_embeddings_equal_v1_embeddings(http, triton, form):
    wire, got = triton
    v1 = http.post("/v1/embeddings", json={"model": MODEL, "input": TEXTS}).json()
    expected = np.array([d["embedding"] for d in v1["data"]], dtype=np.float32)
    vectors = np.array(got[f"embed_{form}"]["vectors"], dtype=np.float32)
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(vectors, expected, atol=1e-6, rtol=0)
    if wire == "http":  # the answer came in the form the client asked for
        assert got[f"embed_{form}"]["binary"] == {"embedding": form == "default"}


@pytest.mark.parametrize("form", ["default", "json"])
def test_generation_equals_v1_completions_greedy(http, triton, form):
    wire, got = triton
    v1 = http.post("/v1/completions", json={"model": LM, "prompt": PROMPTS, **GREEDY}).json()
    choices = sorted(v1["choices"], key=lambda c: c["index"])
    assert got[f"generate_{form}"]["text_output"] == [c["text"] for c in choices]
    assert got[f"generate_{form}"]["finish_reason"] == [c["finish_reason"] for c in choices]
    if wire == "http":
        assert set(got[f"generate_{form}"]["binary"].values()) == {form == "default"}


def test_errors_reach_the_client_with_the_servers_message(triton):
    _, got = triton
    assert "max_tokens" in got["errors"]["bad_max_tokens"]
    assert "does not exist" in got["errors"]["unknown_model"]
