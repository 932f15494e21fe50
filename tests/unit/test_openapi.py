"""The OpenAPI document is true to the one error table: each inference route lists every status the
table answers with, with its protocol's error body (no Ray: the app factory over a stand-in registry)."""

from __future__ import annotations

from app.config import AppConfig
from app.core.errors import statuses
from app.core.guard import InflightGate
from app.ingress import make_api

INFERENCE = {
    ("post", "/v1/embeddings"): "ErrorResponse",
    ("post", "/v1/completions"): "ErrorResponse",
    ("post", "/v1/chat/completions"): "ErrorResponse",
    ("post", "/v2/models/{name}/infer"): "OipError",
}


def _doc() -> dict:
    return make_api(AppConfig(), registry=None, inflight=InflightGate(1, 1), api_keys=()).openapi()  # type: ignore[arg-type]


def test_every_inference_route_lists_every_status_of_the_table_with_its_protocols_body():
    paths = _doc()["paths"]
    table = {str(s) for s in statuses()}
    assert {"400", "401", "404", "413", "500", "503", "504"} <= table
    for (method, path), body in INFERENCE.items():
        responses = paths[path][method]["responses"]
        assert table <= set(responses), (path, table - set(responses))
        for status in table:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith(f"/{body}"), (path, status, ref)


def test_no_route_claims_fastapis_422_since_validation_errors_are_400():
    for path, operations in _doc()["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)


def test_model_routes_list_401_and_404():
    paths = _doc()["paths"]
    for path in ("/v2/models/{name}", "/v2/models/{name}/ready"):
        assert {"401", "404", "503"} <= set(paths[path]["get"]["responses"])
    assert {"401", "503"} <= set(paths["/v1/models"]["get"]["responses"])
