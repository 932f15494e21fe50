"""`python -m batch generate` in-process on the session's Ray cluster: prompts and chats through vLLM,
compared with vLLM's offline engine on the same checkpoint and engine arguments (tests/vllm_reference.py:
the same results the online Generator's tests compare with); bad rows in the errors file."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from batch.run import Job, run
from models.params import SamplingParams
from tests.batch.data import read_errors
from tests.helpers import SERVE_CONFIG
from tests.vllm_reference import CASES, LM, PROMPT, QUESTION

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a vLLM engine starts: minutes on 2 loaded cores
GREEDY = CASES["greedy_completion"]["params"]  # and greedy_chat's: the reference's two greedy cases


def test_prompts_and_chats_equal_vllm_offline_and_bad_rows_are_recorded(vllm_offline, cluster, tmp_path):
    assert CASES["greedy_chat"] == {"messages": QUESTION, "params": GREEDY}
    reference = [vllm_offline["greedy_completion"], vllm_offline["greedy_chat"]]
    rows = [
        {"id": "completion", "prompt": PROMPT},
        {"id": "chat", "messages": QUESTION},
        {"id": "number", "prompt": 5},
        {"id": "none"},
        {"id": "too-long", "prompt": "word " * 2100},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = Job(
        task="generate",
        model=LM,
        input=str(path),
        output=tmp_path / "out",
        config=SERVE_CONFIG,
        text_field="prompt,messages",
        progress=False,
        sampling=SamplingParams(**GREEDY),
        batch_size=1,
    )  # one sequence per engine call, as the reference runs them
    summary = run(job)
    assert (summary.rows_written, summary.errors_written) == (2, 3)
    got = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    for key, ref in zip(("completion", "chat"), reference):
        assert (got[key]["text"], got[key]["finish_reason"]) == (ref["text"], ref["finish_reason"])
        assert got[key]["completion_tokens"] == len(ref["token_ids"]) and got[key]["prompt_tokens"] > 0
    assert "Paris" in got["chat"]["text"]
    errors = {e["id"]: e["reason"] for e in read_errors(tmp_path / "out")}
    assert errors["number"].startswith("prompt: expected a string") and errors["none"] == "missing prompt"
    assert "maximum context length is 2048 tokens" in errors["too-long"]
