"""Wire schemas and the error table, without Ray or HTTP."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.core.errors import (
    ERROR_TABLE,
    ClientError,
    InputTooLong,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    RayInferError,
    ServerError,
    kind_of,
)
from app.core.inputs import embed_job
from app.openai.errors import error_body
from app.openai.protocol import EmbeddingRequest


def to_job(req: EmbeddingRequest, max_items: int):
    return embed_job(req.input, max_items)


@pytest.mark.parametrize(
    "value,texts,ids",
    [
        ("hi", ["hi"], None),
        (["a", "b"], ["a", "b"], None),
        ([1, 2, 3], None, [[1, 2, 3]]),
        ([[1, 2], [3]], None, [[1, 2], [3]]),
    ],
)
def test_every_input_shape_becomes_a_job(value, texts, ids):
    job = to_job(EmbeddingRequest(model="m", input=value), max_items=10)
    assert (job.texts, job.token_ids) == (texts, ids)


@pytest.mark.parametrize("value", ["", [], [""], [1.5], [True], [[1], "a"], [[]], None, {"a": 1}])
def test_bad_input_names_the_field(value):
    with pytest.raises(ValidationError) as e:
        EmbeddingRequest(model="m", input=value)
    assert e.value.errors()[0]["loc"] == ("input",)


def test_item_limit_names_the_limit():
    with pytest.raises(PayloadTooLarge, match="at most 3"):
        to_job(EmbeddingRequest(model="m", input=["x"] * 4), max_items=3)


def test_error_table_is_exhaustive_and_split_by_side():
    for cls in ERROR_TABLE:
        status = ERROR_TABLE[cls].http_status
        assert (400 <= status < 500) == issubclass(cls, ClientError), cls
    assert kind_of(ModelNotFound("x")).http_status == 404
    assert kind_of(InputTooLong("x")).code == "context_length_exceeded"
    assert kind_of(Overloaded("x")).grpc_code == "UNAVAILABLE"


def test_errors_survive_pickling_with_their_fields():
    import pickle

    for exc in (InputTooLong("too long", "input"), Overloaded("full", retry_after_s=3), ServerError("x")):
        back = pickle.loads(pickle.dumps(exc))
        assert (type(back), back.message, back.param) == (type(exc), exc.message, exc.param)
    assert pickle.loads(pickle.dumps(Overloaded("full", retry_after_s=3))).retry_after_s == 3


def test_openai_error_body_shape():
    body = error_body("nope", kind_of(RayInferError("nope")))
    assert set(body["error"]) == {"message", "type", "param", "code"}
