"""The layout's promises, checked on the imports themselves (README Architecture): the core imports no
protocol, no protocol reaches into another, and nothing the service or its tests run needs the load
tool."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

PROTOCOLS = ("app.openai", "app.oip")


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def offending(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    out = {}
    for path in files(folder):
        bad = sorted(m for m in imports_of(path) if m.startswith(forbidden))
        if bad:
            out[str(path.relative_to(ROOT))] = bad
    return out


def test_the_core_imports_no_protocol_and_no_http():
    assert offending("app/core", (*PROTOCOLS, "app.http", "fastapi", "starlette", "grpc")) == {}


def test_the_http_layer_imports_no_protocol():
    assert offending("app/http", PROTOCOLS) == {}


@pytest.mark.parametrize("protocol,other", [("app/openai", "app.oip"), ("app/oip", "app.openai")])
def test_no_protocol_reaches_into_another(protocol, other):
    assert offending(protocol, (other,)) == {}


def test_model_code_imports_no_ray_and_no_service_code():
    assert offending("models", ("ray", "app", "deployments")) == {}


def test_batch_is_ray_data_plumbing_around_the_model_code_not_the_service():
    assert offending("batch", ("app.core", "app.http", "app.openai", "app.oip", "deployments", "ray.serve")) == {}


@pytest.mark.parametrize("folder", ["app", "batch", "deployments", "models", "tests"])
def test_nothing_but_the_load_tools_own_tests_needs_the_load_tool(folder):
    own = {
        "tests/unit/test_loadtest_report.py",
        "tests/unit/test_loadtest_runner.py",
        "tests/integration/test_loadtest_tool.py",
    }
    found = {p: m for p, m in offending(folder, ("loadtest",)).items() if p not in own}
    assert found == {}


def test_the_checker_sees_imports_at_any_depth(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import a.b\nfrom c import d\ndef f():\n    from e.f import g\n")
    assert imports_of(source) >= {"a.b", "c", "c.d", "e.f", "e.f.g"}
