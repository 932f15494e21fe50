"""What `make serve` does, end to end: `serve run serve_config.yaml` as a subprocess,
then the official `openai` client against it. Runs in its own pytest process (see Makefile)
because `serve run` starts its own Ray cluster.
"""

from __future__ import annotations

import numpy as np
import openai
import pytest

from loadtest.servers import free_port, serve_config_on, serve_run
from tests.helpers import MODEL, cosine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serve_run(serve_config_on(free_port()), log_dir=tmp_path_factory.mktemp("serve")) as url:
        yield url


def test_openai_client_embeddings_match_sentence_transformers(served, reference):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    texts = ["How do I serve a model online?", "Ray Serve scales replicas.", "bonjour"]
    result = client.embeddings.create(model=MODEL, input=texts)
    got = np.array([d.embedding for d in result.data])
    assert cosine(got, reference(texts)).min() >= 0.999
    assert [m.id for m in client.models.list()] == [MODEL, "tiny-lm"]


def test_openai_client_streams_a_completion(served):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    whole = client.completions.create(model="tiny-lm", prompt="Serving models", max_tokens=12, temperature=0)
    stream = client.completions.create(model="tiny-lm", prompt="Serving models", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text
