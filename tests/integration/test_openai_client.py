"""The official `openai` client, unchanged, against the session's Serve instance."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from tests.helpers import MODEL, cosine


@pytest.fixture(scope="module")
def client(serve_url):
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)


def test_embeddings_match_sentence_transformers(client, reference):
    texts = ["The cat sits outside", "A man is playing guitar", "Serving models online"]
    result = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in result.data])
    assert cosine(got, reference(texts)).min() >= 0.999
    assert result.usage.prompt_tokens > 0


def test_float_format_and_models(client):
    result = client.embeddings.create(model=MODEL, input="hello", encoding_format="float")
    assert len(result.data[0].embedding) == 384
    assert [m.id for m in client.models.list()] == [MODEL, "SmolLM2-135M-Instruct", "all-MiniLM-L6-v2-pipeline"]


def test_errors_surface_as_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="missing", input="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="")
    assert e.value.body["param"] == "input"
