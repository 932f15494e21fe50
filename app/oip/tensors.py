"""Open Inference Protocol v2 tensors: the in-process record, its validation, and the encodings
both adapters share (JSON element lists, raw little-endian bytes). No Ray, HTTP or gRPC here.

A tensor's data is always flat and row-major: a list of `bytes` for BYTES, a 1-D numpy array
for every other datatype.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.core.errors import InvalidInput

# OIP datatype → numpy dtype of one element (little-endian, as the raw encoding requires).
# BF16 has no numpy dtype: its elements are kept as their 16-bit patterns. BYTES is variable-size.
NUMPY_DTYPES: dict[str, str] = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
    "BF16": "<u2",
}
DATATYPES = (*NUMPY_DTYPES, "BYTES")
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any  # list[bytes] for BYTES, else a 1-D numpy array; len(data) == prod(shape)


def checked(name: str, datatype: str, shape: Sequence[int], data: Any, field: str) -> Tensor:
    """A Tensor, or InvalidInput naming `field` when datatype, shape and element count disagree."""
    if datatype not in DATATYPES:
        raise InvalidInput(f"{field}: unknown datatype {datatype!r}; one of {', '.join(DATATYPES)}", field)
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise InvalidInput(f"{field}: shape {list(shape)} must be non-negative integers", field)
    expected = math.prod(shape)
    if len(data) != expected:
        raise InvalidInput(f"{field}: {len(data)} elements for shape {list(shape)}, which holds {expected}", field)
    return Tensor(name, datatype, tuple(shape), data)


def from_elements(name: str, datatype: str, shape: Sequence[int], elements: Sequence[Any], field: str) -> Tensor:
    """From a flat element list (a JSON `data` array, or a typed gRPC contents field).

    BYTES elements may be `bytes` or `str` (taken as UTF-8, as OIP's JSON form sends them).
    """
    if datatype == "BYTES":
        data = []
        for i, e in enumerate(elements):
            if isinstance(e, str):
                e = e.encode("utf-8")
            if not isinstance(e, bytes):
                raise InvalidInput(f"{field}: element {i} of a BYTES tensor must be a string", field)
            data.append(e)
        return checked(name, datatype, shape, data, field)
    if datatype not in NUMPY_DTYPES:
        return checked(name, datatype, shape, [], field)  # raises: unknown datatype
    try:
        array = np.asarray(list(elements), dtype=NUMPY_DTYPES[datatype])
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(f"{field}: elements are not all {datatype} values", field) from None
    if array.ndim != 1:
        raise InvalidInput(f"{field}: elements are not all {datatype} values", field)
    return checked(name, datatype, shape, array, field)


def flatten(data: Any) -> list:
    """OIP's JSON form allows `data` flat or nested in the tensor's shape; row-major either way."""
    if not isinstance(data, list) or not any(isinstance(d, list) for d in data):
        return data if isinstance(data, list) else [data]
    out: list = []
    for d in data:
        out.extend(flatten(d) if isinstance(d, list) else [d])
    return out


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes, field: str) -> Tensor:
    """From raw contents: fixed-size elements packed little-endian, or length-prefixed BYTES elements."""
    if datatype == "BYTES":
        elements, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise InvalidInput(f"{field}: raw BYTES contents end inside an element's length", field)
            (size,) = _LENGTH.unpack_from(raw, at)
            if at + 4 + size > len(raw):
                raise InvalidInput(f"{field}: raw BYTES element of {size} bytes runs past the contents", field)
            elements.append(raw[at + 4 : at + 4 + size])
            at += 4 + size
        return checked(name, datatype, shape, elements, field)
    if datatype not in NUMPY_DTYPES:
        return checked(name, datatype, shape, [], field)  # raises: unknown datatype
    itemsize = np.dtype(NUMPY_DTYPES[datatype]).itemsize
    if len(raw) % itemsize:
        raise InvalidInput(f"{field}: {len(raw)} raw bytes is not a whole number of {datatype} elements", field)
    return checked(name, datatype, shape, np.frombuffer(raw, dtype=NUMPY_DTYPES[datatype]), field)


def to_raw(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return b"".join(_LENGTH.pack(len(e)) + e for e in tensor.data)
    return np.ascontiguousarray(tensor.data, dtype=NUMPY_DTYPES[tensor.datatype]).tobytes()


def to_elements(tensor: Tensor) -> list:
    """Flat JSON-ready elements: BYTES as UTF-8 strings, numbers as Python numbers."""
    if tensor.datatype == "BYTES":
        return [e.decode("utf-8", errors="replace") for e in tensor.data]
    return np.asarray(tensor.data).tolist()


def texts_of(tensor: Tensor, field: str) -> list[str]:
    """A model's text input: BYTES of shape [N], each element valid UTF-8."""
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"{field}: datatype must be BYTES (UTF-8 text), got {tensor.datatype}", field)
    if len(tensor.shape) != 1:
        raise InvalidInput(f"{field}: shape must be [N] (N texts), got {list(tensor.shape)}", field)
    texts = []
    for i, e in enumerate(tensor.data):
        try:
            texts.append(e.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(f"{field}: element {i} is not valid UTF-8", field) from None
    return texts
