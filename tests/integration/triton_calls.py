"""What a Triton user's program does with NVIDIA's client and its default settings, as a program of its
own: `python -m tests.integration.triton_calls http|grpc HOST:PORT EMBED_MODEL LM` prints the answers
as JSON for tests/integration/test_triton_clients.py to check.

A process of its own because tritonclient.grpc's generated messages and this project's
(app/oip/grpc/, from KServe's proto) share the protobuf package `inference`: one Python process cannot
import both (duplicate symbols in protobuf's default pool). A Triton user's program imports only the client.
"""

from __future__ import annotations

import json
import sys

import numpy as np

TEXTS = ["The cat sits outside", "A man is playing guitar", "naïve café ☕"]
PROMPTS = ["Serving models online is", "Ray Serve"]
GREEDY = {"max_tokens": 16, "temperature": 0.0}


def meta(obj, wire: str) -> dict:
    """Metadata as a dict, from the HTTP client's JSON or the gRPC client's message."""
    if wire == "http":
        return obj
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(obj, preserving_proto_field_name=True)


def infer(client, module, wire: str, model: str, name: str, texts: list[str], binary: bool | None, outputs, **params):
    """binary None: the client's defaults throughout (HTTP: binary tensors both ways)."""
    tensor = module.InferInput(name, [len(texts)], "BYTES")
    data = np.array([t.encode() for t in texts], dtype=np.object_)
    flag = {"binary_data": binary} if wire == "http" and binary is not None else {}
    tensor.set_data_from_numpy(data, **flag)
    requested = None if binary is None else [module.InferRequestedOutput(o, **flag) for o in outputs]
    return client.infer(model, [tensor], outputs=requested, parameters=params or None)


def texts_of(array) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else x for x in array.tolist()]


def binary_sizes(result, wire: str, names) -> dict[str, bool]:
    """HTTP: whether each output came as raw bytes after the JSON header."""
    if wire != "http":
        return {}
    return {n: "binary_data_size" in (result.get_output(n).get("parameters") or {}) for n in names}


def run(wire: str, url: str, embed_model: str, lm: str) -> dict:
    if wire == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module  # type: ignore[no-redef]
    from tritonclient.utils import InferenceServerException

    client = module.InferenceServerClient(url=url)
    out: dict = {"live": client.is_server_live(), "ready": client.is_server_ready()}
    out["server"] = meta(client.get_server_metadata(), wire)
    out["models"] = {
        m: {"ready": client.is_model_ready(m), "metadata": meta(client.get_model_metadata(m), wire)}
        for m in (embed_model, lm)
    }
    for form, binary in (("default", None), ("json", False)):
        r = infer(client, module, wire, embed_model, "text", TEXTS, binary, ["embedding"])
        out[f"embed_{form}"] = {
            "vectors": r.as_numpy("embedding").tolist(),
            "binary": binary_sizes(r, wire, ["embedding"]),
        }
        names = ["text_output", "finish_reason"]
        r = infer(client, module, wire, lm, "text_input", PROMPTS, binary, names, **GREEDY)
        out[f"generate_{form}"] = {n: texts_of(r.as_numpy(n)) for n in names} | {"binary": binary_sizes(r, wire, names)}
    out["errors"] = {}
    for case, call in {
        "bad_max_tokens": lambda: infer(client, module, wire, lm, "text_input", PROMPTS, None, [], max_tokens=-1),
        "unknown_model": lambda: client.get_model_metadata("no-such-model"),
    }.items():
        try:
            call()
            out["errors"][case] = None
        except InferenceServerException as exc:
            out["errors"][case] = exc.message()
    client.close()
    return out


if __name__ == "__main__":
    print(json.dumps(run(*sys.argv[1:5])))
