"""Serve's health checks do real work: the Generator's, on an idle engine, generates a token (its engine
counts it). The embedding model's real forward is tested without Ray (tests/unit/test_colocated.py)."""

from __future__ import annotations

from ray import serve
from ray._common.test_utils import wait_for_condition

LM = "SmolLM2-135M-Instruct"


def test_an_idle_generators_health_check_generates_a_real_token(serve_url):
    generator = serve.get_deployment_handle(f"Generator-{LM}", app_name="rayinfer")
    before = generator.stats.remote().result()["tokens"]

    def probed() -> bool:
        # Nothing else generates now: the token can only come from a health check (this one, or Serve's
        # own every 10 s), which generates once the engine has been idle IDLE_PROBE_AFTER_S (5 s).
        generator.check_health.remote().result()
        return generator.stats.remote().result()["tokens"] > before

    wait_for_condition(probed, timeout=90, retry_interval_ms=1000)
