"""JSON responses encoded with orjson: numpy arrays (embedding vectors) are written straight from
their buffers, float32 in its shortest exact form, several times faster than `json` on 384 floats
per text (BENCHMARKS.md)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
