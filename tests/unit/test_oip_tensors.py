"""Open Inference Protocol tensors and the gRPC adapter's conversions, with no Ray cluster:
parsing, validation, the raw encoding, and the proto's conformance with KServe's definition."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest

from app.core.errors import DeadlineExceeded, InvalidInput, ModelNotFound, Overloaded, PayloadTooLarge
from app.oip.core import InferResponse
from app.oip.grpc import grpc_predict_v2_pb2 as pb
from app.oip.grpc.servicer import request_from_proto, response_to_proto, status_of
from app.oip.tensors import Tensor, flatten, from_elements, from_raw, texts_of, to_elements, to_raw


def test_bytes_tensor_from_json_strings_and_back():
    t = from_elements("text", "BYTES", [2], ["naïve", "b"], "text")
    assert t == Tensor("text", "BYTES", (2,), ["naïve".encode(), b"b"])
    assert texts_of(t, "text") == ["naïve", "b"]
    assert to_elements(t) == ["naïve", "b"]


def test_nested_data_is_flattened_row_major():
    assert flatten([[1, 2], [3, [4]]]) == [1, 2, 3, 4]
    t = from_elements("x", "FP32", [2, 2], flatten([[1, 2], [3, 4]]), "x")
    assert t.data.dtype == np.float32 and t.data.tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "datatype, shape, data, words",
    [
        ("BYTES", [3], ["a", "b"], "2 elements for shape [3], which holds 3"),
        ("BYTES", [1, 1], ["a", "b"], "holds 1"),
        ("BYTES", [-1], ["a"], "non-negative"),
        ("STRING", [1], ["a"], "unknown datatype"),
        ("BYTES", [1], [7], "must be a string"),
        ("INT32", [2], ["x", 1], "INT32 values"),
        ("FP32", [1], [[1.0]], "FP32 values"),
    ],
)
def test_bad_tensor_is_invalid_input_naming_the_field(datatype, shape, data, words):
    with pytest.raises(InvalidInput, match=re.escape(words)) as e:
        from_elements("t", datatype, shape, data, "inputs[0] `t`")
    assert e.value.param == "inputs[0] `t`"


@pytest.mark.parametrize(
    "tensor, words",
    [
        (Tensor("text", "FP32", (1,), np.zeros(1, np.float32)), "datatype must be BYTES"),
        (Tensor("text", "BYTES", (1, 1), [b"a"]), r"shape must be \[N\]"),
        (Tensor("text", "BYTES", (1,), [b"\xff"]), "not valid UTF-8"),
    ],
)
def test_text_input_must_be_utf8_bytes_of_shape_n(tensor, words):
    with pytest.raises(InvalidInput, match=words):
        texts_of(tensor, "text")


def test_raw_round_trip_bytes_and_fp32():
    texts = Tensor("t", "BYTES", (3,), [b"", b"ab", "☕".encode()])
    raw = to_raw(texts)
    assert raw[:4] == b"\x00\x00\x00\x00" and raw[4:8] == (2).to_bytes(4, "little")
    assert from_raw("t", "BYTES", [3], raw, "t") == texts
    vectors = Tensor("v", "FP32", (2, 2), np.arange(4, dtype=np.float32))
    back = from_raw("v", "FP32", [2, 2], to_raw(vectors), "v")
    assert back.data.tolist() == [0, 1, 2, 3] and back.shape == (2, 2)


@pytest.mark.parametrize(
    "datatype, shape, raw, words",
    [
        ("BYTES", [1], b"\x05\x00\x00\x00ab", "runs past"),
        ("BYTES", [1], b"\x01\x00", "inside an element's length"),
        ("BYTES", [2], b"\x01\x00\x00\x00a", "1 elements for shape [2]"),
        ("FP32", [2], b"\x00" * 7, "whole number"),
        ("FP32", [3], b"\x00" * 8, "2 elements for shape [3]"),
    ],
)
def test_bad_raw_contents_are_invalid_input(datatype, shape, raw, words):
    with pytest.raises(InvalidInput, match=re.escape(words)):
        from_raw("t", datatype, shape, raw, "t")


def test_grpc_request_typed_and_raw_give_the_same_record():
    typed = pb.ModelInferRequest(
        model_name="m", id="7", parameters={"temperature": pb.InferParameter(double_param=0.5)}
    )
    tensor = typed.inputs.add(name="text", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([b"a", b"bc"])
    typed.outputs.add(name="embedding")
    raw = pb.ModelInferRequest()
    raw.CopyFrom(typed)
    raw.inputs[0].ClearField("contents")
    raw.raw_input_contents.append(b"\x01\x00\x00\x00a\x02\x00\x00\x00bc")
    for msg in (typed, raw):
        req = request_from_proto(msg)
        assert (req.model, req.id, req.parameters, req.outputs) == ("m", "7", {"temperature": 0.5}, ["embedding"])
        assert req.inputs == [Tensor("text", "BYTES", (2,), [b"a", b"bc"])]


def test_raw_contents_must_cover_every_input():
    msg = pb.ModelInferRequest(model_name="m", raw_input_contents=[b""])
    msg.inputs.add(name="a", datatype="BYTES", shape=[0])
    msg.inputs.add(name="b", datatype="BYTES", shape=[0])
    with pytest.raises(InvalidInput, match="1 entries for 2 inputs"):
        request_from_proto(msg)


def test_grpc_response_answers_in_the_request_form():
    resp = InferResponse("m", "7", [Tensor("embedding", "FP32", (1, 2), np.array([0.5, 1.5], np.float32))], {"f": True})
    typed, raw = response_to_proto(resp, raw=False), response_to_proto(resp, raw=True)
    assert list(typed.outputs[0].contents.fp32_contents) == [0.5, 1.5] and not typed.raw_output_contents
    assert np.frombuffer(raw.raw_output_contents[0], "<f4").tolist() == [0.5, 1.5]
    assert not raw.outputs[0].HasField("contents") and raw.parameters["f"].bool_param


@pytest.mark.parametrize(
    "exc, code",
    [
        (InvalidInput("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (PayloadTooLarge("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (ModelNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (Overloaded("x"), grpc.StatusCode.UNAVAILABLE),
        (DeadlineExceeded("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
def test_grpc_status_comes_from_the_one_error_table(exc, code):
    assert status_of(exc) == (code, "x")


def test_a_bug_is_internal_and_leaks_nothing():
    assert status_of(KeyError("secret")) == (grpc.StatusCode.INTERNAL, "internal server error")


# KServe's grpc_predict_v2.proto: (message, field) → (number, type, repeated). The wire format
# depends on exactly these; a drift here breaks every OIP client.
T = pb.DESCRIPTOR.message_types_by_name["ModelInferRequest"].fields_by_name["id"]
KSERVE_FIELDS = {
    ("ServerLiveResponse", "live"): (1, T.TYPE_BOOL, False),
    ("ServerReadyResponse", "ready"): (1, T.TYPE_BOOL, False),
    ("ModelReadyRequest", "name"): (1, T.TYPE_STRING, False),
    ("ModelReadyRequest", "version"): (2, T.TYPE_STRING, False),
    ("ModelReadyResponse", "ready"): (1, T.TYPE_BOOL, False),
    ("ServerMetadataResponse", "name"): (1, T.TYPE_STRING, False),
    ("ServerMetadataResponse", "version"): (2, T.TYPE_STRING, False),
    ("ServerMetadataResponse", "extensions"): (3, T.TYPE_STRING, True),
    ("ModelMetadataRequest", "name"): (1, T.TYPE_STRING, False),
    ("ModelMetadataRequest", "version"): (2, T.TYPE_STRING, False),
    ("ModelMetadataResponse", "name"): (1, T.TYPE_STRING, False),
    ("ModelMetadataResponse", "versions"): (2, T.TYPE_STRING, True),
    ("ModelMetadataResponse", "platform"): (3, T.TYPE_STRING, False),
    ("ModelMetadataResponse", "inputs"): (4, T.TYPE_MESSAGE, True),
    ("ModelMetadataResponse", "outputs"): (5, T.TYPE_MESSAGE, True),
    ("ModelMetadataResponse.TensorMetadata", "name"): (1, T.TYPE_STRING, False),
    ("ModelMetadataResponse.TensorMetadata", "datatype"): (2, T.TYPE_STRING, False),
    ("ModelMetadataResponse.TensorMetadata", "shape"): (3, T.TYPE_INT64, True),
    ("ModelInferRequest", "model_name"): (1, T.TYPE_STRING, False),
    ("ModelInferRequest", "model_version"): (2, T.TYPE_STRING, False),
    ("ModelInferRequest", "id"): (3, T.TYPE_STRING, False),
    ("ModelInferRequest", "parameters"): (4, T.TYPE_MESSAGE, True),
    ("ModelInferRequest", "inputs"): (5, T.TYPE_MESSAGE, True),
    ("ModelInferRequest", "outputs"): (6, T.TYPE_MESSAGE, True),
    ("ModelInferRequest", "raw_input_contents"): (7, T.TYPE_BYTES, True),
    ("ModelInferRequest.InferInputTensor", "name"): (1, T.TYPE_STRING, False),
    ("ModelInferRequest.InferInputTensor", "datatype"): (2, T.TYPE_STRING, False),
    ("ModelInferRequest.InferInputTensor", "shape"): (3, T.TYPE_INT64, True),
    ("ModelInferRequest.InferInputTensor", "parameters"): (4, T.TYPE_MESSAGE, True),
    ("ModelInferRequest.InferInputTensor", "contents"): (5, T.TYPE_MESSAGE, False),
    ("ModelInferRequest.InferRequestedOutputTensor", "name"): (1, T.TYPE_STRING, False),
    ("ModelInferRequest.InferRequestedOutputTensor", "parameters"): (2, T.TYPE_MESSAGE, True),
    ("ModelInferResponse", "model_name"): (1, T.TYPE_STRING, False),
    ("ModelInferResponse", "model_version"): (2, T.TYPE_STRING, False),
    ("ModelInferResponse", "id"): (3, T.TYPE_STRING, False),
    ("ModelInferResponse", "parameters"): (4, T.TYPE_MESSAGE, True),
    ("ModelInferResponse", "outputs"): (5, T.TYPE_MESSAGE, True),
    ("ModelInferResponse", "raw_output_contents"): (6, T.TYPE_BYTES, True),
    ("ModelInferResponse.InferOutputTensor", "name"): (1, T.TYPE_STRING, False),
    ("ModelInferResponse.InferOutputTensor", "datatype"): (2, T.TYPE_STRING, False),
    ("ModelInferResponse.InferOutputTensor", "shape"): (3, T.TYPE_INT64, True),
    ("ModelInferResponse.InferOutputTensor", "parameters"): (4, T.TYPE_MESSAGE, True),
    ("ModelInferResponse.InferOutputTensor", "contents"): (5, T.TYPE_MESSAGE, False),
    ("InferParameter", "bool_param"): (1, T.TYPE_BOOL, False),
    ("InferParameter", "int64_param"): (2, T.TYPE_INT64, False),
    ("InferParameter", "string_param"): (3, T.TYPE_STRING, False),
    ("InferTensorContents", "bool_contents"): (1, T.TYPE_BOOL, True),
    ("InferTensorContents", "int_contents"): (2, T.TYPE_INT32, True),
    ("InferTensorContents", "int64_contents"): (3, T.TYPE_INT64, True),
    ("InferTensorContents", "uint_contents"): (4, T.TYPE_UINT32, True),
    ("InferTensorContents", "uint64_contents"): (5, T.TYPE_UINT64, True),
    ("InferTensorContents", "fp32_contents"): (6, T.TYPE_FLOAT, True),
    ("InferTensorContents", "fp64_contents"): (7, T.TYPE_DOUBLE, True),
    ("InferTensorContents", "bytes_contents"): (8, T.TYPE_BYTES, True),
    ("RepositoryModelLoadRequest", "model_name"): (1, T.TYPE_STRING, False),
    ("RepositoryModelLoadResponse", "model_name"): (1, T.TYPE_STRING, False),
    ("RepositoryModelLoadResponse", "isLoaded"): (2, T.TYPE_BOOL, False),
    ("RepositoryModelUnloadRequest", "model_name"): (1, T.TYPE_STRING, False),
    ("RepositoryModelUnloadResponse", "model_name"): (1, T.TYPE_STRING, False),
    ("RepositoryModelUnloadResponse", "isUnloaded"): (2, T.TYPE_BOOL, False),
}
KSERVE_RPCS = {
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
}


def _message(path: str):
    outer, *inner = path.split(".")
    desc = pb.DESCRIPTOR.message_types_by_name[outer]
    for name in inner:
        desc = desc.nested_types_by_name[name]
    return desc


@pytest.mark.parametrize("where", sorted(KSERVE_FIELDS), ids=lambda w: ".".join(w))
def test_proto_fields_match_kserve(where):
    field = _message(where[0]).fields_by_name[where[1]]
    number, kind, repeated = KSERVE_FIELDS[where]
    assert (field.number, field.type, field.is_repeated) == (number, kind, repeated)


def test_proto_service_is_kserves_plus_tritons_stream():
    assert pb.DESCRIPTOR.package == "inference"
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert {m.name for m in service.methods} == KSERVE_RPCS | {"ModelStreamInfer"}
    stream = service.methods_by_name["ModelStreamInfer"]
    assert (stream.client_streaming, stream.server_streaming) == (True, True)
    assert stream.output_type.name == "ModelStreamInferResponse"
    for m in service.methods:
        if m.name in KSERVE_RPCS:
            assert (m.input_type.name, m.output_type.name) == (f"{m.name}Request", f"{m.name}Response")
