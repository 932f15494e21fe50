"""/v1/completions and /v1/chat/completions on SmolLM2-135M-Instruct (vLLM's engine in the Generator),
through the official client and plain HTTP; outputs compared with vLLM's offline `LLM` on the same
checkpoint and engine arguments."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import openai
import pytest
from ray import serve
from ray._common.test_utils import wait_for_condition

from app.core.errors import DeadlineExceeded
from deployments.types import GenerateJob
from models.params import SamplingParams
from tests.vllm_reference import LM, PROMPT, QUESTION

# The first test here may start the session's cluster (a vLLM engine: minutes on a loaded 2-core machine)
# and the offline reference engine.
pytestmark = pytest.mark.timeout(900)
APP = "rayinfer"
CONTEXT = 2048  # serve_config.yaml's max_input_tokens for the model


@pytest.fixture(scope="module")
def client(serve_url):
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def generator(serve_url):
    return serve.get_deployment_handle(f"Generator-{LM}", app_name=APP)


def test_greedy_completion_equals_vllm_offline(vllm_offline, client):  # offline first: before the cluster starts
    result = client.completions.create(model=LM, prompt=PROMPT, max_tokens=30, temperature=0)
    assert result.object == "text_completion" and result.model == LM
    [choice] = result.choices
    assert choice.text == vllm_offline["greedy_completion"]["text"]
    assert choice.finish_reason == vllm_offline["greedy_completion"]["finish_reason"]
    assert result.usage.completion_tokens == len(vllm_offline["greedy_completion"]["token_ids"])
    assert result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_greedy_chat_equals_vllm_offline_and_makes_sense(client, vllm_offline):
    result = client.chat.completions.create(model=LM, messages=QUESTION, max_tokens=30, temperature=0)
    answer = result.choices[0].message.content
    assert answer == vllm_offline["greedy_chat"]["text"]
    assert "Paris" in answer, answer


def test_seeded_sample_equals_vllm_offline(client, vllm_offline):
    result = client.completions.create(model=LM, prompt=PROMPT, max_tokens=20, temperature=0.9, top_p=0.9, seed=7)
    assert result.choices[0].text == vllm_offline["seeded"]["text"]


def test_penalties_equal_vllm_offline_and_change_the_text(client, vllm_offline):
    args = dict(model=LM, prompt=PROMPT, max_tokens=40, temperature=0)
    penalised = client.completions.create(**args, presence_penalty=1.5, frequency_penalty=1.0).choices[0].text
    assert penalised == vllm_offline["penalties"]["text"]
    assert penalised != client.completions.create(**args).choices[0].text


def test_chat_logprobs_equal_vllm_offline(client, vllm_offline):
    result = client.chat.completions.create(
        model=LM, messages=QUESTION, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    content = result.choices[0].logprobs.content
    reference = vllm_offline["chat_logprobs"]["logprobs"]
    assert len(content) == len(reference) == result.usage.completion_tokens
    # The text leaves out the end-of-sequence token; its logprob is there, as vLLM's server gives it.
    assert "".join(t.token for t in content).removesuffix("<|im_end|>") == result.choices[0].message.content
    for token, ref in zip(content, reference):
        assert (token.token, [t.token for t in token.top_logprobs]) == (ref["token"], [tok for tok, _ in ref["top"]])
        assert token.logprob == pytest.approx(ref["logprob"], abs=1e-3) and token.logprob <= 0
        assert [t.logprob for t in token.top_logprobs] == pytest.approx([lp for _, lp in ref["top"]], abs=1e-3)
        assert bytes(token.bytes).decode() == token.token


def test_completion_logprobs_streamed_and_not_equal_vllm_offline(client, vllm_offline):
    args = dict(model=LM, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2)
    whole = client.completions.create(**args).choices[0]
    reference = vllm_offline["completion_logprobs"]["logprobs"]
    assert whole.logprobs.tokens == [ref["token"] for ref in reference]
    assert whole.logprobs.token_logprobs == pytest.approx([ref["logprob"] for ref in reference], abs=1e-3)
    assert [list(top) for top in whole.logprobs.top_logprobs] == [list(dict(ref["top"])) for ref in reference]
    offsets = whole.logprobs.text_offset
    assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], whole.logprobs.tokens))
    streamed = [c.choices[0].logprobs for c in client.completions.create(**args, stream=True) if c.choices]
    assert [t for lp in streamed if lp for t in lp.tokens] == whole.logprobs.tokens
    assert [o for lp in streamed if lp for o in lp.text_offset] == offsets


def test_min_tokens_and_ignore_eos(client):
    args = dict(model=LM, messages=QUESTION, temperature=0, max_tokens=60)
    short = client.chat.completions.create(**args)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 40
    held = client.chat.completions.create(**args, extra_body={"min_tokens": 40})
    assert held.usage.completion_tokens >= 40
    endless = client.chat.completions.create(**args, extra_body={"ignore_eos": True})
    assert endless.usage.completion_tokens == 60 and endless.choices[0].finish_reason == "length"


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


def test_thirty_concurrent_chats_each_equal_their_solo_run(serve_url):
    topics = ["Paris", "the sea", "Ray Serve", "bread", "a cat", "rain"]
    messages = [
        [{"role": "user", "content": f"Say something about {topics[i % 6]} in {1 + i % 5} words. #{i}"}]
        for i in range(30)
    ]

    def body(i: int) -> dict:
        return {
            "model": LM,
            "messages": messages[i],
            "max_tokens": 8 + i % 16,
            "temperature": 0 if i % 2 else 0.9,
            "seed": i,
        }

    async def send(c: httpx.AsyncClient, i: int) -> str:
        r = await c.post("/v1/chat/completions", json=body(i))
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    async def go():
        async with httpx.AsyncClient(base_url=serve_url, timeout=300) as c:
            together = await asyncio.gather(*(send(c, i) for i in range(30)))
            alone = [await send(c, i) for i in range(30)]
        return together, alone

    together, alone = asyncio.run(go())
    assert together == alone


def test_dropped_stream_frees_its_slot(serve_url, http, generator):
    body = {"model": LM, "prompt": PROMPT, "max_tokens": 480, "temperature": 0.7, "seed": 5, "ignore_eos": True}
    before = generator.stats.remote().result()["tokens"]
    body["stream"] = True
    with httpx.Client(base_url=serve_url, timeout=60) as c, c.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    # The client went away after its first chunk: the request is aborted in the engine, its tokens stop.
    wait_for_condition(lambda: generator.stats.remote().result()["unfinished"] == 0, timeout=10, retry_interval_ms=50)
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
        ({"logprobs": 6}, "logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"echo": True}, None),
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
    r = http.post("/v1/completions", json={"model": LM, "prompt": PROMPT, "max_tokens": CONTEXT})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and str(CONTEXT) in error["message"]
    assert f"{CONTEXT} for the completion" in error["message"] and error["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):  # streamed: still a plain 400, not a broken stream
        list(client.completions.create(model=LM, prompt=PROMPT, max_tokens=CONTEXT, stream=True))


def test_wrong_model_kind_is_404(http):
    r = http.post("/v1/completions", json={"model": "all-MiniLM-L6-v2", "prompt": PROMPT})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = http.post("/v1/embeddings", json={"model": LM, "input": PROMPT})
    assert r.status_code == 404


def test_a_job_past_its_deadline_never_reaches_the_engine(generator):
    """A job whose deadline passed while it queued (here: before it was sent) is answered DeadlineExceeded
    by the Generator, which hands the engine nothing: counted by the sequences it submits."""
    before = generator.stats.remote().result()
    job = GenerateJob(params=SamplingParams(max_tokens=16), prompts=[PROMPT, PROMPT], deadline=time.time() - 1)
    items = list(generator.options(stream=True).generate.remote(job))
    after = generator.stats.remote().result()
    assert len(items) == 1 and isinstance(items[0], DeadlineExceeded), items
    assert after["submitted"] == before["submitted"], "the engine got work whose deadline had passed"
    assert after.get("expired_generate_queue", 0) == before.get("expired_generate_queue", 0) + 1


def test_a_deadline_stops_a_started_generation(http, generator):
    """A streamed completion that has started (its first chunk arrived) is stopped by the server when its
    deadline passes: the stream ends without its last chunk and the engine stops generating for it."""
    max_tokens = CONTEXT - 16  # far more than 2 cores generate within the deadline
    body = {"model": LM, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    before = generator.stats.remote().result()
    chunks, finished = 0, False
    with http.stream("POST", "/v1/completions", json=body, headers={"x-request-timeout-seconds": "8"}) as r:
        assert r.status_code == 200, r.read()
        with contextlib.suppress(httpx.HTTPError):  # the server may cut the connection at the deadline
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    chunks += "choices" in event  # an error event (the deadline's) is not a chunk
                    finished |= any(c.get("finish_reason") for c in event.get("choices", []))
    assert chunks >= 1, "the generation never started: this test needs its first token within the deadline"
    assert not finished, "the completion ran to its end: the deadline stopped nothing"
    wait_for_condition(lambda: generator.stats.remote().result()["unfinished"] == 0, timeout=30, retry_interval_ms=100)
    after = generator.stats.remote().result()
    assert after["submitted"] == before["submitted"] + 1
    assert after["tokens"] - before["tokens"] < max_tokens


# JSON has no NaN or Infinity, but Python's parser (and many clients) accept the literals.
NON_FINITE = [
    ("/v1/completions", '{"model": "SmolLM2-135M-Instruct", "prompt": "x", "temperature": NaN}', "temperature"),
    ("/v1/completions", '{"model": "SmolLM2-135M-Instruct", "prompt": "x", "top_p": Infinity}', "top_p"),
    (
        "/v1/chat/completions",
        '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "x"}], "temperature": -Infinity}',
        "temperature",
    ),
    ("/v1/completions", '{"model": "SmolLM2-135M-Instruct", "prompt": "x", "max_tokens": NaN}', "max_tokens"),
    ("/v1/embeddings", '{"model": "all-MiniLM-L6-v2", "input": [NaN]}', "input"),
    (
        "/v2/models/SmolLM2-135M-Instruct/infer",
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
