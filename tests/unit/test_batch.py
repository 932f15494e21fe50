"""batch/ without Ray: input discovery and parsing, model lookup and resources, the output's manifest and
errors file, and a split encoder run row by row (what the batch stage pools call)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import asdict, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from app.config import ModelConfig
from batch import output, sources
from batch.sources import ERROR, VALUE, Fields, InputError, expand, parquet_chunks, text_check, text_chunks
from batch.spec import Overrides, Pool, SpecError, check_fits, find_model, fit_concurrency, model_spec
from models.embedding import EmbeddingModel
from models.encoder_stages import load_encoder_stage, run_rows
from tests.helpers import MODEL, SERVE_CONFIG

FIELDS = Fields("id", "text", text_check)


def test_expand_a_file_a_directory_and_a_glob(tmp_path):
    for name in ("a.jsonl", "b.jsonl", "_SUCCESS", ".hidden.jsonl", "notes.txt"):
        (tmp_path / name).write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jsonl").write_text("")
    assert expand(str(tmp_path / "a.jsonl")) == ([str(tmp_path / "a.jsonl")], "jsonl")
    files, fmt = expand(str(tmp_path))
    assert fmt == "jsonl" and [f.rsplit("/", 2)[-2:] for f in files] == [
        [tmp_path.name, "a.jsonl"],
        [tmp_path.name, "b.jsonl"],
        ["sub", "c.jsonl"],
    ]
    assert expand(str(tmp_path / "*.jsonl"))[0] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    with pytest.raises(InputError, match="--format"):
        expand(str(tmp_path / "*"))  # .jsonl and .txt
    with pytest.raises(InputError, match="no input files"):
        expand(str(tmp_path / "missing-*.csv"))


def chunks_of(text: str, fmt: str, fields: Fields = FIELDS) -> tuple[pa.Table, list[dict]]:
    ((table, no_id),) = list(text_chunks(io.BytesIO(text.encode()), fmt, fields, "in"))
    return table, no_id


def test_jsonl_rows_keep_their_id_and_carry_their_error():
    lines = [
        {"id": 1, "text": "a"},
        {"id": "x", "text": ""},
        {"id": 2, "text": 3},
        {"id": 3},
        {"id": 4, "text": None},
        {"id": 5, "text": ["a"]},
    ]
    table, no_id = chunks_of("\n".join(map(json.dumps, lines)) + "\n\n", "jsonl")
    assert table["id"].to_pylist() == ["1", "x", "2", "3", "4", "5"]
    assert table[VALUE].to_pylist() == ["a", "", None, None, None, None]
    assert table[ERROR].to_pylist() == [
        None,
        None,
        "text: expected a string, got a number",
        "missing text",
        "missing text",
        "text: expected a string, got an array",
    ]
    assert no_id == []


def test_rows_without_a_usable_id_are_kept_out_with_their_line():
    text = '{"text": "a"}\n{"id": null, "text": "b"}\n[1, 2]\n{"id": 1.5, "text": "c"}\n{oops\n{"id": true}\n'
    table, no_id = chunks_of(text, "jsonl")
    assert table.num_rows == 0
    assert [(e["source"], e["reason"].split(":")[0]) for e in no_id] == [
        ("in:1", "missing id"),
        ("in:2", "missing id"),
        ("in:3", "expected a JSON object, got an array"),
        ("in:4", "id"),
        ("in:5", "invalid JSON"),
        ("in:6", "id"),
    ]


def test_csv_rows_by_header_with_quoted_newlines():
    text = 'doc,body,other\nd1,"hello, world","two\nlines"\nd2,,x\n,orphan,y\n'
    table, no_id = chunks_of(text, "csv", Fields("doc", "body", text_check))
    assert table["doc"].to_pylist() == ["d1", "d2"]
    assert table[VALUE].to_pylist() == ["hello, world", None]
    assert table[ERROR].to_pylist() == [None, "missing text"]
    assert no_id == [{"reason": "missing id", "source": "in:5"}]


def test_parquet_ids_keep_their_type_and_a_wrong_text_type_is_every_rows_error(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": pa.array([1, None, 3], pa.int64()), "text": ["a", "b", None]}), path)
    ((table, no_id),) = list(parquet_chunks(pq.ParquetFile(path), Fields("id", "text", text_check, pa.int64()), "p"))
    assert table["id"].type == pa.int64() and table["id"].to_pylist() == [1, 3]
    assert table[ERROR].to_pylist() == [None, "missing text"]
    assert no_id == [{"reason": "missing id", "source": "p:row 1"}]
    pq.write_table(pa.table({"id": ["a"], "text": [7]}), path)
    ((table, _),) = list(parquet_chunks(pq.ParquetFile(path), FIELDS, "p"))
    assert table[ERROR].to_pylist() == ["text: expected a string, got a number"]
    with pytest.raises(InputError, match="no column 'doc'"):
        list(parquet_chunks(pq.ParquetFile(path), Fields("doc", "text", text_check), "p"))


def test_count_rows_per_file(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    (tmp_path / "b.csv").write_text("id,text\n1,a\n2,b\n3,c\n")
    assert sources.count_rows([str(tmp_path / "a.jsonl")], "jsonl") == {str(tmp_path / "a.jsonl"): 2}
    assert sources.count_rows([str(tmp_path / "b.csv")], "csv") == {str(tmp_path / "b.csv"): 3}


def test_models_come_from_the_serve_config_with_their_deployments_resources():
    cfg, options = find_model(SERVE_CONFIG, MODEL, "embed")
    spec = model_spec(cfg, options, Overrides())
    (pool,) = spec.pools
    # placement: ingress: online, the model runs inside the Ingress, whose resources it takes.
    assert (pool.name, pool.num_cpus, pool.num_gpus, pool.threads) == ("Ingress", 1.0, 0.0, 2)
    # concurrent_batches: 2 online (two batches at once, a thread each): one actor computing two calls at once.
    assert (pool.calls, pool.threads_per_call) == (cfg.concurrent_batches, 1) == (2, 1)
    assert model_spec(cfg, options, Overrides(threads=4, calls=1)).pools[0].threads_per_call == 4
    # The Ingress's environment, less Serve's own settings (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD).
    assert "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD" in options["Ingress"]["runtime_env"]["env_vars"]
    assert pool.env == {"OMP_WAIT_POLICY": "PASSIVE"} and cfg.runtime == "auto"
    cfg, options = find_model(SERVE_CONFIG.with_name("serve_config.pipeline.yaml"), f"{MODEL}-pipeline", "embed")
    spec = model_spec(cfg, options, Overrides(num_gpus=1, concurrency=(1, 2)), [(0, 1), (1, 6)])
    assert [(p.name, p.layers, p.num_gpus, p.concurrency) for p in spec.pools] == [
        (f"Stage0-{MODEL}-pipeline", (0, 1), 1, (1, 2)),
        (f"Stage1-{MODEL}-pipeline", (1, 6), 1, (1, 2)),
    ]
    with pytest.raises(SpecError, match=r"no model 'nope'.*all-MiniLM-L6-v2"):
        find_model(SERVE_CONFIG, "nope", "embed")
    with pytest.raises(SpecError, match="has task 'embed'"):
        find_model(SERVE_CONFIG, MODEL, "generate")


def test_pools_that_cannot_be_placed_are_refused_before_starting():
    pool = Pool("Embedder-m", num_cpus=1, num_gpus=0, threads=2)
    spec = model_spec(ModelConfig(name="m", task="embed", source="x"), {}, Overrides())
    check_fits(spec, {"CPU": 3}, 1.0)
    with pytest.raises(SpecError, match="need 3 CPUs; the cluster has 2"):
        check_fits(spec, {"CPU": 2}, 1.0)
    gpu = model_spec(ModelConfig(name="m", task="embed", source="x"), {}, Overrides(num_gpus=1))
    with pytest.raises(SpecError, match="needs 1 GPU per actor; the cluster has 0"):
        check_fits(gpu, {"CPU": 8}, 1.0)
    assert fit_concurrency(pool, {"CPU": 9}, 1) == (1, 4)
    assert fit_concurrency(pool, {"CPU": 9}, 2) == (1, 2)
    # beside one read/tokenize/write task: the local cluster of a 2-core machine (3 CPUs) holds one 2-thread actor
    assert fit_concurrency(pool, {"CPU": 3}, 1, task_cpus=1.0) == (1, 1)
    assert fit_concurrency(replace(pool, threads=1), {"CPU": 3}, 1, task_cpus=1.0) == (1, 2)


def test_manifest_refuses_another_run_and_accepts_the_same(tmp_path):
    output.claim(tmp_path / "out", {"model": "a", "inputs": ["x"]})
    output.claim(tmp_path / "out", {"model": "a", "inputs": ["x"]})
    with pytest.raises(output.ManifestMismatch, match="model: 'a' then, 'b' now"):
        output.claim(tmp_path / "out", {"model": "b", "inputs": ["x"]})


def test_errors_file_gathers_every_part(tmp_path):
    (tmp_path / output.ERRORS_DIR).mkdir()
    pq.write_table(
        pa.table({"id": pa.array([7, 8], pa.int64()), "reason": ["r1", "r2"]}),
        tmp_path / output.ERRORS_DIR / "task.parquet",
    )
    pq.write_table(
        pa.table({"id": pa.nulls(1, pa.string()), "reason": ["missing id"], "source": ["f:3"]}),
        tmp_path / output.ERRORS_DIR / "noid-x.parquet",
    )
    assert output.consolidate_errors(tmp_path, "id") == 3
    lines = [json.loads(line) for line in (tmp_path / output.ERRORS_FILE).read_text().splitlines()]
    assert lines == [
        {"id": None, "reason": "missing id", "source": "f:3"},
        {"id": 7, "reason": "r1"},
        {"id": 8, "reason": "r2"},
    ]


def test_split_encoder_run_row_by_row_gives_the_whole_models_vectors(bundled_path):
    torch.set_num_threads(1)
    whole = EmbeddingModel(bundled_path)
    ids = whole.tokenize(["a short one", "a somewhat longer sentence than the first", "x"])
    stages = [load_encoder_stage(bundled_path, 0, 2), load_encoder_stage(bundled_path, 2, 6)]
    rows = [np.asarray(t) for t in ids]
    hidden = run_rows(stages[0], rows, chunk_size=2, pad_id=whole.pad_id)
    assert [h.shape for h in hidden] == [(len(t), whole.dim) for t in ids]
    vectors = np.stack(run_rows(stages[1], hidden, chunk_size=2))
    np.testing.assert_allclose(vectors, whole.embed_ids(ids, 32), atol=1e-5)


def test_generate_rows_take_a_prompt_or_else_a_chat():
    from batch.generate import value_check

    fields = Fields("id", "prompt,messages", value_check)
    chat = [{"role": "user", "content": "hi"}]
    lines = [
        {"id": 1, "prompt": "p"},
        {"id": 2, "messages": chat},
        {"id": 3, "messages": [{"role": "user"}]},
        {"id": 4, "prompt": 7},
        {"id": 5},
    ]
    table, _ = chunks_of("\n".join(map(json.dumps, lines)), "jsonl", fields)
    values = [json.loads(v) if v else None for v in table[VALUE].to_pylist()]
    assert values == [{"prompt": "p"}, {"messages": chat}, None, None, None]
    assert table[ERROR].to_pylist()[2:] == [
        'prompt: expected a string, or a list of {"role": ..., "content": ...} messages'
    ] * 2 + ["missing prompt"]


def test_tokenize_tasks_give_the_online_tokenizers_ids_without_torch_or_transformers(bundled_path):
    """The tokenize stage's fast path (tokenizer.json on `tokenizers`) against AutoTokenizer, on varied
    text; and a process that only tokenizes imports neither torch nor transformers."""
    from batch.embed import embed_job
    from batch.tokens import TOKENS, tokenize
    from tests.helpers import varied_texts

    cfg = ModelConfig(name="m", task="embed", source=str(bundled_path), max_input_tokens=64)
    job = embed_job(cfg, str(bundled_path))
    assert job.fast_tokenizer and job.max_tokens == 64
    whole = EmbeddingModel(bundled_path, weights=False, max_input_tokens=64)
    texts = varied_texts()
    full = whole.tokenize(texts)
    assert max(len(ids) for ids in full) > 64  # some are cut (closing token kept), or refused
    table = pa.table({"id": list(range(len(texts))), VALUE: texts, ERROR: pa.nulls(len(texts), pa.string())})
    assert tokenize(table, replace(job, truncate=True))[TOKENS].to_pylist() == [whole.truncate(ids) for ids in full]
    assert [e is None for e in tokenize(table, job)[ERROR].to_pylist()] == [len(ids) <= 64 for ids in full]
    fields = asdict(job)
    probe = (
        "import sys, pyarrow as pa; from batch.tokens import TOKENS, EmbedJob, tokenize; "
        "from batch.sources import VALUE, ERROR; "
        f"t = tokenize(pa.table({{'id': [1], VALUE: ['hello world'], ERROR: pa.nulls(1, pa.string())}}), "
        f"EmbedJob(**{fields!r})); "
        "print(t[TOKENS].to_pylist()[0], 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["False", "False"], out
    assert out.rsplit(" ", 2)[0] == str(whole.tokenize(["hello world"])[0])


def test_the_fast_path_is_refused_where_tokenizer_json_disagrees_or_is_missing(bundled_path, tmp_path, monkeypatch):
    import shutil

    import batch.embed
    from batch.embed import embed_job

    cfg = ModelConfig(name="m", task="embed", source=str(bundled_path))
    monkeypatch.setattr(batch.embed, "encode", lambda tok, texts: [e.ids[1:] for e in tok.encode_batch(texts)])
    assert not embed_job(cfg, str(bundled_path)).fast_tokenizer
    monkeypatch.undo()
    shutil.copytree(bundled_path, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()  # AutoTokenizer builds it from vocab.txt
    assert not embed_job(cfg, str(tmp_path / "m")).fast_tokenizer
