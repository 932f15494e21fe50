"""Pipeline planning from a config alone (meta device), and `python -m app.plan`."""

from __future__ import annotations

import itertools
import random

import pytest

from app.plan import main
from models.pipeline_plan import balanced_boundaries, gpus_needed, layer_bytes, load_config, plan
from tests.helpers import MODEL, ROOT

LLAMA_70B = ROOT / "models" / "configs" / "llama-3-70b.json"


def test_smollm2_in_two_stages_covers_every_layer_once():
    config = load_config("built:smollm2-135m-instruct")
    p = plan(config, 2, "float32")
    assert [s.layers for s in p.stages] == [(0, 15), (15, 30)]
    assert sum(s.param_bytes for s in p.stages) == p.total_param_bytes
    first, _per_layer, last = layer_bytes(config, "float32")
    # SmolLM2 ties its head to the embeddings: both end stages carry a copy.
    assert first == last - 576 * 4  # the last stage also holds the final norm (hidden size 576)


def test_the_encoder_splits_too():
    p = plan(load_config(f"bundled:{MODEL}"), 2, "float32")
    # Its word embeddings (30522 x 384) weigh as much as five of its layers: balanced by bytes,
    # stage 0 takes them and one layer.
    assert p.num_layers == 6 and [s.layers for s in p.stages] == [(0, 1), (1, 6)]
    assert sum(s.param_bytes for s in p.stages) == p.total_param_bytes
    assert [s.kv_bytes_per_token for s in p.stages] == [0, 0]  # an encoder keeps no KV cache


def test_cli_plans_an_encoder(capsys):
    assert main(["--model", f"bundled:{MODEL}", "--stages", "2", "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "bert: 6 layers, 86.64 MiB of parameters in float32"
    assert lines[2].split() == ["0", "[0,", "1)", "52.23", "-"] and lines[3].split()[:3] == ["1", "[1,", "6)"]


def test_llama_70b_needs_three_80gib_gpus_in_bf16():
    p = gpus_needed(load_config(LLAMA_70B), 80 * 2**30)
    assert len(p.stages) == 3
    assert abs(p.total_param_bytes - 2 * 70.55e9) / (2 * 70.55e9) < 0.01  # 70.55 B parameters
    assert p.max_stage_bytes <= 0.8 * 80 * 2**30
    assert p.stages[0].layers[0] == 0 and p.stages[-1].layers[1] == 80


def test_boundaries_minimise_the_largest_stage():
    rng = random.Random(0)
    for _ in range(30):
        layers = [rng.randint(1, 100) for _ in range(rng.randint(2, 9))]
        first, last, k = rng.randint(0, 200), rng.randint(0, 200), rng.randint(1, min(4, len(layers)))

        def largest(cuts, layers=layers, first=first, last=last, k=k):
            edges = [0, *cuts, len(layers)]
            return max(
                sum(layers[a:b]) + (first if i == 0 else 0) + (last if i == k - 1 else 0)
                for i, (a, b) in enumerate(itertools.pairwise(edges))
            )

        best = min(largest(c) for c in itertools.combinations(range(1, len(layers)), k - 1))
        assert largest(balanced_boundaries(first, layers, last, k)) == best


def test_explicit_and_bad_boundaries():
    config = load_config("built:smollm2-135m-instruct")
    assert [s.layers for s in plan(config, 2, "float32", [1]).stages] == [(0, 1), (1, 30)]
    for bad in ([0], [30], [2, 1]):
        with pytest.raises(ValueError, match="boundaries"):
            plan(config, 2 if len(bad) == 1 else 3, "float32", bad)
    with pytest.raises(ValueError, match="stages must be between"):
        plan(config, 31, "float32")


def test_cli_says_how_many_gpus(capsys):
    assert main(["--model", str(LLAMA_70B), "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "GPUs needed at 80 GiB each: 3" in out and "[54, 80)" in out
    assert main(["--model", str(LLAMA_70B), "--stages", "1", "--gpu-memory", "80GiB"]) == 1
