"""vLLM's offline `LLM` on a served model's checkpoint, with the engine arguments the Generator uses:
the reference served outputs are compared with. Run as a script (vLLM's engine core is a child
process), one JSON list of cases on stdin, one JSON list of results on stdout:

    {"messages": [...]} or {"prompt": "..."}, with "params": vLLM SamplingParams fields
    → {"text", "token_ids", "finish_reason",
       "logprobs": [{"token", "logprob", "top": [[token, logprob], ...]} per position] | null}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from app.config import AppConfig
from models.loader import resolve_source
from models.vllm_engine import engine_env, engine_kwargs

ROOT = Path(__file__).resolve().parents[1]
LM = "SmolLM2-135M-Instruct"
PROMPT = "Serving models online is"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
# What the tests compare with vLLM's offline engine, by name: the served API's (tests/integration/
# test_completions_api.py) and `python -m batch generate`'s (tests/batch/test_generate.py). One
# offline engine answers them all, once a session (the `vllm_offline` fixture, tests/conftest.py).
CASES = {
    "greedy_completion": {"prompt": PROMPT, "params": {"max_tokens": 30, "temperature": 0}},
    "greedy_chat": {"messages": QUESTION, "params": {"max_tokens": 30, "temperature": 0}},
    "chat_logprobs": {"messages": QUESTION, "params": {"max_tokens": 12, "temperature": 0, "logprobs": 3}},
    "completion_logprobs": {"prompt": PROMPT, "params": {"max_tokens": 10, "temperature": 0, "logprobs": 2}},
    "penalties": {
        "prompt": PROMPT,
        "params": {"max_tokens": 40, "temperature": 0, "presence_penalty": 1.5, "frequency_penalty": 1.0},
    },
    "seeded": {"prompt": PROMPT, "params": {"max_tokens": 20, "temperature": 0.9, "top_p": 0.9, "seed": 7}},
}


def served_model(name: str, config_file: str = "serve_config.yaml"):
    """The ModelConfig of model `name` in one of the shipped Serve config files."""
    app = yaml.safe_load((ROOT / config_file).read_text())["applications"][0]
    return next(m for m in AppConfig.model_validate(app["args"]).models if m.name == name)


def offline(model: str, cases: dict[str, dict]) -> dict[str, dict]:
    """vLLM's offline results for `cases` (name → case), by name: this module in a child process."""
    run = subprocess.run(
        [sys.executable, "-m", "tests.vllm_reference", model],
        input=json.dumps(list(cases.values())),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    line = next((x for x in run.stdout.splitlines() if x.startswith("REFERENCE ")), None)
    assert line is not None, run.stderr[-3000:]
    return dict(zip(cases, json.loads(line.removeprefix("REFERENCE ")), strict=True))


def main() -> None:
    from vllm import LLM, SamplingParams

    cfg = served_model(sys.argv[1])
    os.environ.update(engine_env(cfg))
    kwargs = engine_kwargs(cfg, resolve_source(cfg.source))
    kwargs.pop("enable_log_requests", None)  # AsyncEngineArgs only
    llm = LLM(**kwargs)
    results = []
    for case in json.load(sys.stdin):
        params = SamplingParams(**case["params"])
        if "messages" in case:
            out = llm.chat(case["messages"], params, use_tqdm=False)[0]
        else:
            out = llm.generate([case["prompt"]], params, use_tqdm=False)[0]
        c = out.outputs[0]
        logprobs = None
        if c.logprobs is not None:  # per position: the sampled token, its logprob, the k most likely
            k = case["params"]["logprobs"]
            logprobs = []
            for t, d in zip(c.token_ids, c.logprobs):
                top = sorted(d.values(), key=lambda lp: lp.rank)[:k]
                logprobs.append(
                    {
                        "token": d[t].decoded_token,
                        "logprob": d[t].logprob,
                        "top": [[lp.decoded_token, lp.logprob] for lp in top],
                    }
                )
        results.append(
            {"text": c.text, "token_ids": list(c.token_ids), "finish_reason": c.finish_reason, "logprobs": logprobs}
        )
    print("\nREFERENCE " + json.dumps(results))


if __name__ == "__main__":
    main()
