"""/v1/completions and /v1/chat/completions on tiny-lm, through the official client and plain HTTP."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch
from ray import serve
from ray._common.test_utils import wait_for_condition
from transformers import AutoModelForCausalLM

from models.causal_lm import CausalLM
from models.tiny_lm import ensure

LM = "tiny-lm"
APP = "rayinfer"
PROMPT = "Serving models online is"


@pytest.fixture(scope="module")
def client(serve_url):
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hf_greedy():
    lm = CausalLM(ensure())
    hf = AutoModelForCausalLM.from_pretrained(lm.path).eval()

    def generate(prompt: str, max_tokens: int) -> str:
        ids = lm.encode(prompt)
        with torch.inference_mode():
            out = hf.generate(
                torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id
            )
        return lm.decode(out[0, len(ids) :].tolist())

    return generate


@pytest.fixture(scope="module")
def generator(serve_url):
    return serve.get_deployment_handle(f"Generator-{LM}", app_name=APP)


def test_greedy_completion_equals_hugging_face_generate(client, hf_greedy):
    result = client.completions.create(model=LM, prompt=PROMPT, max_tokens=30, temperature=0)
    assert result.object == "text_completion" and result.model == LM
    [choice] = result.choices
    assert choice.text == hf_greedy(PROMPT, 30)
    assert choice.finish_reason in ("length", "stop")
    assert result.usage.completion_tokens <= 30 and result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_streamed_text_equals_the_whole_response(client):
    args = dict(model=LM, prompt=PROMPT, max_tokens=40, temperature=0.8, seed=11)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stream_ends_with_done(http):
    body = {"model": LM, "prompt": PROMPT, "max_tokens": 5, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "text_completion" for e in events[:-1])


def test_list_prompt_and_n_give_one_choice_each_streamed_or_not(client):
    args = dict(model=LM, prompt=["a", "b"], n=2, max_tokens=12, temperature=1, seed=3)
    result = client.completions.create(**args)
    assert sorted(c.index for c in result.choices) == [0, 1, 2, 3]
    streamed = {i: "" for i in range(4)}
    for chunk in client.completions.create(**args, stream=True):
        assert len({c.index for c in chunk.choices}) == len(chunk.choices), "one delta per choice per chunk"
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == {c.index: c.text for c in result.choices}


def test_chat_completion_streamed_and_not(client):
    messages = [{"role": "user", "content": "How do replicas batch?"}]
    whole = client.chat.completions.create(model=LM, messages=messages, max_tokens=20, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(model=LM, messages=messages, max_tokens=20, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_thirty_concurrent_requests_each_equal_their_solo_run(serve_url):
    prompts = [f"{PROMPT} {i} " * (1 + i % 4) for i in range(30)]

    def body(i: int) -> dict:
        return {
            "model": LM,
            "prompt": prompts[i],
            "max_tokens": 8 + i % 16,
            "temperature": 0 if i % 2 else 0.9,
            "seed": i,
        }

    async def send(c: httpx.AsyncClient, i: int) -> str:
        r = await c.post("/v1/completions", json=body(i))
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    async def go():
        async with httpx.AsyncClient(base_url=serve_url, timeout=120) as c:
            together = await asyncio.gather(*(send(c, i) for i in range(30)))
            alone = [await send(c, i) for i in range(30)]
        return together, alone

    together, alone = asyncio.run(go())
    assert together == alone


def test_dropped_stream_frees_its_slot(serve_url, http, generator):
    body = {"model": LM, "prompt": PROMPT, "max_tokens": 480, "temperature": 0.7, "seed": 5}
    # Run to the end, this request generates all 480 tokens (no early end of sequence).
    assert http.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 480
    before = generator.stats.remote().result()["tokens"]
    body["stream"] = True
    with httpx.Client(base_url=serve_url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    # The client went away after its first chunk: the sequence leaves the batch, its tokens stop.
    wait_for_condition(lambda: generator.stats.remote().result()["running"] == 0, timeout=10, retry_interval_ms=50)
    generated = generator.stats.remote().result()["tokens"] - before
    assert generated < 480, f"{generated} tokens generated for a client that left"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": 10**6}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [[1, 2], "x"]}, "prompt"),
        ({"prompt": [[10**7]]}, "prompt"),
        ({"logprobs": 3}, None),
        ({"stream_options": {"include_usage": True}}, None),
        ({"seed": 2**70}, "seed"),
    ],
)
def test_bad_parameters_get_400_naming_the_field(http, extra, param):
    r = http.post("/v1/completions", json={"model": LM, "prompt": PROMPT, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    name = next(iter(extra))
    assert name in error["message"] or name == "prompt"


def test_context_overflow_is_400_naming_the_numbers(http, client):
    r = http.post("/v1/completions", json={"model": LM, "prompt": PROMPT, "max_tokens": 600})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and "512" in error["message"] and "600" in error["message"]
    with pytest.raises(openai.BadRequestError):  # streamed: still a plain 400, not a broken stream
        list(client.completions.create(model=LM, prompt=PROMPT, max_tokens=600, stream=True))


def test_wrong_model_kind_is_404(http):
    r = http.post("/v1/completions", json={"model": "all-MiniLM-L6-v2", "prompt": PROMPT})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = http.post("/v1/embeddings", json={"model": LM, "input": PROMPT})
    assert r.status_code == 404


def test_a_deadline_times_out_and_cancels_the_generation(http, generator):
    body = {"model": LM, "prompt": PROMPT, "max_tokens": 480, "temperature": 0.7, "seed": 5}
    before = generator.stats.remote().result()["tokens"]
    r = http.post("/v1/completions", json=body, headers={"x-request-timeout-seconds": "0.3"})
    # Serve enforces its own header: 408 Request Timeout, and the request's task is cancelled.
    assert r.status_code == 408 and "timed out" in r.text, (r.status_code, r.text)
    wait_for_condition(lambda: generator.stats.remote().result()["running"] == 0, timeout=10, retry_interval_ms=50)
    generated = generator.stats.remote().result()["tokens"] - before
    assert generated < 480, f"{generated} tokens generated past the deadline"


# JSON has no NaN or Infinity, but Python's parser (and many clients) accept the literals.
NON_FINITE = [
    ("/v1/completions", '{"model": "tiny-lm", "prompt": "x", "temperature": NaN}', "temperature"),
    ("/v1/completions", '{"model": "tiny-lm", "prompt": "x", "top_p": Infinity}', "top_p"),
    (
        "/v1/chat/completions",
        '{"model": "tiny-lm", "messages": [{"role": "user", "content": "x"}], "temperature": -Infinity}',
        "temperature",
    ),
    ("/v1/completions", '{"model": "tiny-lm", "prompt": "x", "max_tokens": NaN}', "max_tokens"),
    ("/v1/embeddings", '{"model": "all-MiniLM-L6-v2", "input": [NaN]}', "input"),
    (
        "/v2/models/tiny-lm/infer",
        '{"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["x"]}],'
        ' "parameters": {"temperature": NaN}}',
        "temperature",
    ),
]


@pytest.mark.parametrize("path,body,field", NON_FINITE, ids=[f"{p} {f}" for p, _, f in NON_FINITE])
def test_nan_and_infinity_are_a_4xx_naming_the_field(http, path, body, field):
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert field in r.text, r.text
