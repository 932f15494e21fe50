"""What `make serve` does, end to end: `serve run serve_config.yaml` as a subprocess,
then the official `openai` client against it. Runs in its own pytest process (see Makefile)
because `serve run` starts its own Ray cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import yaml

from tests.helpers import MODEL, ROOT, cosine, free_port, load_serve_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    port = free_port()
    config_path = tmp_path_factory.mktemp("cfg") / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(load_serve_config(port)))
    log = (tmp_path_factory.mktemp("log") / "serve.log").open("w+")
    env = {**os.environ, "RAY_ADDRESS": "local"}  # never attach to another Ray cluster
    serve_bin = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen(
        [str(serve_bin), "run", str(config_path)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"serve run did not become ready (exit {proc.poll()}):\n{log.read()[-4000:]}")
            time.sleep(0.5)  # polling for readiness, not synchronising test steps
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C on `make serve` does
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_openai_client_embeddings_match_sentence_transformers(served, reference):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    texts = ["How do I serve a model online?", "Ray Serve scales replicas.", "bonjour"]
    result = client.embeddings.create(model=MODEL, input=texts)
    got = np.array([d.embedding for d in result.data])
    assert cosine(got, reference(texts)).min() >= 0.999
    assert [m.id for m in client.models.list()] == [MODEL]

