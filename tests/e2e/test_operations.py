"""Operating rayinfer on a long-lived cluster (`ray start --head`, then `serve deploy`), under
steady traffic: a rolling update fails no request, a SIGKILLed model replica loses none,
/readyz goes false while a model has no replica and back, a SIGKILLed ingress replica or HAProxy
costs a retrying client no embedding and anyone else only retriable failures, autoscaling goes up
and down.

One cluster for the module; each test deploys the config it starts from (a no-op when the cluster
already runs it) and waits until it is settled, so none depends on another's side effects or order.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
from ray._common.test_utils import wait_for_condition

from tests.harness import RayHead, ray_head, serve_deploy, session_processes
from tests.helpers import MODEL, free_port, serve_config_on

# A module's first test starts its cluster, a vLLM engine among it: minutes on a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.ops, pytest.mark.timeout(1200)]
APP = "rayinfer"
LM = "SmolLM2-135M-Instruct"
EMBEDDER, GENERATOR = f"Embedder-{MODEL}", f"Generator-{LM}"
# The `embed_retrying` load's openai client: its backoff (0.5 s doubling to 8 s, jittered) over 20
# retries waits at least 100 s in all, longer than Serve takes to replace a killed HAProxy (29 s measured).
OPENAI_RETRIES = 20
FAILED_BACKOFF_S = 0.2
CONNECTION_ERRORS = {"ConnectError", "ReadError", "RemoteProtocolError", "WriteError"}  # httpx's


def base_config() -> dict:
    """The shipped config without the pipeline model (its stages add nothing here but start-up time),
    and with the embedding model in its own deployment (`placement: replica`, how a larger or GPU model
    is served): the operations act on model replicas."""
    config = serve_config_on(free_port())
    app = config["applications"][0]
    app["args"]["models"] = [m for m in app["args"]["models"] if m["name"] in (MODEL, LM)]
    model_args(config, MODEL)["placement"] = "replica"
    app["deployments"] = [d for d in app["deployments"] if d["name"] in ("Ingress", GENERATOR)]
    app["deployments"].append(
        {"name": EMBEDDER, "num_replicas": 1, "max_ongoing_requests": 64, "max_queued_requests": 512,
         "backpressure_config": {"retry_after_s": 1}, "ray_actor_options": {"num_cpus": 1}}
    )  # fmt: skip
    # A restarted Generator starts a new vLLM engine: ~30 s on idle 2 cores, minutes when the machine is
    # loaded. The retry window covers it (the default 30 s suits replicas that start in seconds).
    app["args"]["replica_retry_s"] = 300
    return config


def model_args(config: dict, name: str) -> dict:
    return next(m for m in config["applications"][0]["args"]["models"] if m["name"] == name)


def deployment(config: dict, name: str) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


@dataclass
class Outcome:
    kind: str
    start: float
    end: float
    ok: bool
    detail: str


class Load:
    """Closed-loop traffic from a background thread; every request's outcome is kept."""

    def __init__(self, url: str, **workers: int):
        self.url, self.workers = url, workers
        self.outcomes: list[Outcome] = []
        self._done = threading.Condition()
        self._stop = threading.Event()
        self.error: BaseException | None = None  # what killed the load thread, if anything did
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # re-raised in the test's thread by __exit__
            self.error = exc
            with self._done:
                self._done.notify_all()

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=180)
        assert not self._thread.is_alive(), "a request did not finish within its timeout"
        if self.error is not None:
            raise RuntimeError("the load thread died") from self.error

    def wait_for(self, more: int, timeout_s: float = 120) -> None:
        """Block until `more` requests beyond those finished now have finished."""
        with self._done:
            target = len(self.outcomes) + more
            reached = self._done.wait_for(lambda: len(self.outcomes) >= target or self.error is not None, timeout_s)
        if self.error is not None:
            raise RuntimeError("the load thread died") from self.error
        assert reached, (len(self.outcomes), target)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def spanning(self, t: float, kind: str | None = None) -> list[Outcome]:
        """Requests in flight at time t."""
        return [o for o in self.outcomes if o.start < t < o.end and kind in (None, o.kind)]

    async def _run(self) -> None:
        # The official client as a user would configure it to ride out a restart of the first hop:
        # its own retries (connection errors, 5xx, honouring Retry-After) with its own backoff.
        retrying = openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key="none", max_retries=OPENAI_RETRIES, timeout=360
        )
        async with httpx.AsyncClient(base_url=self.url, timeout=360) as client, retrying:
            await asyncio.gather(
                *(self._worker(client, retrying, kind, i) for kind, n in self.workers.items() for i in range(n))
            )

    async def _worker(self, client: httpx.AsyncClient, retrying: openai.AsyncOpenAI, kind: str, worker: int) -> None:
        i = 0
        while not self._stop.is_set():
            start, text = time.monotonic(), f"worker {worker} request {i}"
            try:
                if kind == "embed_retrying":
                    ok, detail = await _embed_retrying(retrying, text)
                else:
                    ok, detail = await {"embed": _embed, "complete": _complete, "stream": _stream}[kind](client, text)
            except Exception as exc:  # any exception is a failed request (a bad body, a JSON error, ...)
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            with self._done:
                self.outcomes.append(Outcome(kind, start, time.monotonic(), ok, detail))
                self._done.notify_all()
            i += 1
            if not ok:  # back off as a client does: a refused connection fails in microseconds
                await asyncio.sleep(FAILED_BACKOFF_S)


async def _embed(client: httpx.AsyncClient, text: str) -> tuple[bool, str]:
    r = await client.post("/v1/embeddings", json={"model": MODEL, "input": [text] * 4})
    return r.status_code == 200 and len(r.json()["data"]) == 4, f"{r.status_code} {r.text[:300]}"


async def _embed_retrying(client: openai.AsyncOpenAI, text: str) -> tuple[bool, str]:
    r = await client.embeddings.create(model=MODEL, input=[text] * 4)
    return len(r.data) == 4, f"{len(r.data)} vectors"


async def _complete(client: httpx.AsyncClient, text: str) -> tuple[bool, str]:
    r = await client.post("/v1/completions", json={"model": LM, "prompt": text, "max_tokens": 24})
    ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    return ok, f"{r.status_code} {r.text[:300]}"


async def _stream(client: httpx.AsyncClient, text: str) -> tuple[bool, str]:
    body = {"model": LM, "prompt": text, "max_tokens": 48, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:  # an error body, not a stream
            return False, f"{r.status_code} {(await r.aread()).decode(errors='replace')[:300]}"
        events = [line[len("data: ") :] async for line in r.aiter_lines() if line.startswith("data: ")]
    finished = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1] if "choices" in json.loads(e)]
    ok = r.status_code == 200 and events[-1:] == ["[DONE]"] and finished[-1:] in (["stop"], ["length"])
    return ok, f"{r.status_code} {events[-3:]}"


class Cluster:
    def __init__(self, head: RayHead, log_dir):
        self.head, self.log_dir, self.deploys = head, log_dir, 0

    def deploy(self, config: dict) -> None:
        self.deploys += 1
        serve_deploy(config, self.head, self.log_dir / f"serve_config_{self.deploys}.yaml")

    def app(self) -> dict:
        r = httpx.get(f"{self.head.dashboard}/api/serve/applications/", headers=self.head.headers, timeout=30)
        r.raise_for_status()
        return r.json()["applications"].get(APP, {})

    def replicas(self, name: str, state: str = "RUNNING") -> list[dict]:
        deployments = self.app().get("deployments", {})
        return [r for r in deployments.get(name, {}).get("replicas", []) if r["state"] == state]

    def settled(self, **replicas: int) -> bool:
        """The app is RUNNING, every deployment HEALTHY, with exactly these RUNNING replica counts."""
        app = self.app()
        if app.get("status") == "DEPLOY_FAILED":
            raise RuntimeError(app.get("message"))
        deployments = app.get("deployments", {})
        return (
            app.get("status") == "RUNNING"
            and all(d["status"] == "HEALTHY" for d in deployments.values())
            and all(
                sum(r["state"] == "RUNNING" for r in deployments[name]["replicas"]) == n
                and len(deployments[name]["replicas"]) == n
                for name, n in replicas.items()
            )
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("ops")
    # Logical CPUs for the replicas an update or autoscaling adds next to the old ones.
    with ray_head(log_dir, num_cpus=8) as head:
        yield Cluster(head, log_dir)


@pytest.fixture(scope="module")
def base(cluster):
    """The config the module's cluster starts from (its ports fixed for the module)."""
    config = base_config()
    deployed(cluster, config, **{EMBEDDER: 1, GENERATOR: 1})
    return config


def updated(base: dict) -> dict:
    """The rolling update's target: batching parameters, a replica count and the generator's settings
    change, so every deployment whose arguments change (the ingress, both models) is replaced."""
    config = copy.deepcopy(base)
    model_args(config, MODEL)["max_batch_size"] = 16
    model_args(config, LM)["stream_interval_s"] = 0.02
    deployment(config, EMBEDDER)["num_replicas"] = 2
    return config


def deployed(cluster: Cluster, config: dict, **replicas: int) -> None:
    """Deploy `config` (Serve changes nothing if the cluster runs it already) and wait until settled."""
    cluster.deploy(config)
    # Maxima: a vLLM engine starts in ~30 s on an idle 2-core machine, minutes on a loaded one.
    wait_for_condition(lambda: cluster.settled(**replicas), timeout=900, retry_interval_ms=500)


@pytest.fixture(scope="module")
def url(base):
    return f"http://127.0.0.1:{base['http_options']['port']}"


def test_a_rolling_update_under_load_fails_no_request(cluster, base, url):
    deployed(cluster, base, **{EMBEDDER: 1, GENERATOR: 1})
    names = ("Ingress", EMBEDDER, GENERATOR)
    old = {name: {r["replica_id"] for r in cluster.replicas(name)} for name in names}
    assert all(old.values()), old
    with Load(url, embed=4, complete=2, stream=2) as load:
        load.wait_for(20)
        started = time.monotonic()
        cluster.deploy(updated(base))
        wait_for_condition(lambda: cluster.settled(**{EMBEDDER: 2, GENERATOR: 1}), timeout=900, retry_interval_ms=500)
        settled = time.monotonic()
        load.wait_for(20)
    assert not load.failures(), load.failures()[:5]
    during = [o for o in load.outcomes if started < o.end and o.start < settled]
    print(
        f"rolling update: {len(load.outcomes)} requests, {len(during)} during the {settled - started:.1f}s update, "
        "0 failed"
    )
    assert {o.kind for o in during} == {"embed", "complete", "stream"}
    for name in names:  # each deployment whose arguments changed runs on new replicas only
        assert not old[name] & {r["replica_id"] for r in cluster.replicas(name)}, f"{name} was not replaced"


def _kill(cluster: Cluster, name: str) -> tuple[int, float]:
    replica = cluster.replicas(name)[0]
    os.kill(replica["pid"], signal.SIGKILL)
    return replica["pid"], time.monotonic()


def test_a_sigkilled_model_replica_loses_no_request_and_readyz_says_so_meanwhile(cluster, base, url):
    replicas = {EMBEDDER: 2, GENERATOR: 1}
    deployed(cluster, updated(base), **replicas)  # two embedder replicas: one is killed, the other answers
    with httpx.Client(base_url=url, timeout=30) as client, Load(url, embed=4, complete=2) as load:
        load.wait_for(20)
        embedder_pid, embedder_killed = _kill(cluster, EMBEDDER)  # one of two: the other one answers
        load.wait_for(10)
        generator_pid, generator_killed = _kill(cluster, GENERATOR)  # the only one: Serve restarts it

        # Its model has no replica now: not ready, naming it; ready again once Serve has replaced it.
        def says_lm_not_ready() -> bool:
            r = client.get("/readyz")
            return r.status_code == 503 and LM in r.json()["models"]

        wait_for_condition(says_lm_not_ready, timeout=30, retry_interval_ms=100)
        wait_for_condition(lambda: cluster.settled(**replicas), timeout=600, retry_interval_ms=500)
        # Ready again once the probes reach the new replicas: under load on 2 cores the restarted engine's
        # first answers can outlast the probe's timeout (a run saw 60 s pass after Serve had settled);
        # the promise is that readiness comes back, not how fast.
        wait_for_condition(lambda: client.get("/readyz").status_code == 200, timeout=300, retry_interval_ms=500)
        load.wait_for(20)
    assert not load.failures(), load.failures()[:5]
    hit = load.spanning(embedder_killed, "embed"), load.spanning(generator_killed, "complete")
    print(
        f"SIGKILL: {len(load.outcomes)} requests, {len(hit[0])} embeddings in flight at the embedder's kill, "
        f"{len(hit[1])} completions at the generator's; 0 failed"
    )
    assert all(hit), "the kills hit requests in flight"
    assert embedder_pid not in {r["pid"] for r in cluster.replicas(EMBEDDER)}
    assert generator_pid not in {r["pid"] for r in cluster.replicas(GENERATOR)}


def two_ingresses(base: dict) -> dict:
    """The updated config (the module's tests after the update start from it: no engine restarts) with
    two ingress replicas, so that one can die while the other answers."""
    config = updated(base)
    deployment(config, "Ingress")["num_replicas"] = 2
    return config


def _retriable(o: Outcome) -> bool:
    """A failure a client can tell it may retry: a cut or refused connection, a 503 (HAProxy's own, or the
    app's with Retry-After) or HAProxy's 502 for a replica that died under the request (`ingress_lost`,
    app/haproxy.py), never a 500 or a 404."""
    lost = o.detail.startswith("502 ") and '"ingress_lost"' in o.detail
    return o.detail.split(":")[0] in CONNECTION_ERRORS or o.detail.startswith("503 ") or lost


def _report(what: str, load: Load, **extra: object) -> list[Outcome]:
    failed = load.failures()
    kinds = {
        kind: (sum(o.kind == kind for o in load.outcomes), sum(o.kind == kind for o in failed)) for kind in load.workers
    }
    print(f"{what}: {extra} requests (failed) by kind: {kinds}; failures: {sorted({o.detail[:70] for o in failed})}")
    return failed


def test_a_sigkilled_ingress_replica_fails_no_retrying_clients_embedding(cluster, base, url):
    """One of two ingress replicas SIGKILLed under load. HAProxy runs an embedding whose replica died
    before answering again on the other one (app/haproxy.py `retry-on empty-response`) and retries at
    connect what it sends to the dead one, but a response cut mid-body, or a keep-alive connection that
    the reload after the death closes as the client sends on it, reaches the client: a client retrying
    idempotent requests (the openai package's own retries) loses no embedding; every other failure is
    one a client can tell is retriable; generation in flight on the killed replica is not re-run unseen."""
    replicas = {"Ingress": 2, EMBEDDER: 2, GENERATOR: 1}
    deployed(cluster, two_ingresses(base), **replicas)
    with Load(url, embed=2, embed_retrying=4, complete=1, stream=1) as load:
        load.wait_for(20)
        pid, killed = _kill(cluster, "Ingress")
        wait_for_condition(
            lambda: cluster.settled(**replicas) and pid not in {r["pid"] for r in cluster.replicas("Ingress")},
            timeout=300,
            retry_interval_ms=500,
        )
        load.wait_for(20)
    hit = [o for o in load.spanning(killed) if o.kind.startswith("embed")]
    failed = _report("ingress SIGKILL", load, embeddings_in_flight=len(hit))
    assert hit, "the kill hit embeddings in flight"
    assert not [o for o in failed if o.kind == "embed_retrying"], failed[:5]
    assert all(_retriable(o) for o in failed), failed[:5]


def test_a_killed_haproxy_is_replaced_and_a_retrying_client_loses_no_embedding(cluster, base, url):
    """SIGKILL to HAProxy (every HAProxy process of the cluster): the connections it held are cut and
    its port refuses until Serve's proxy health check (every 10 s, 3 failures) finds it dead and starts
    another, whose first config has no routes yet (503, app/haproxy.py). A client retrying idempotent
    requests (the openai package, `max_retries`) loses no embedding; every other failure is retriable."""
    replicas = {"Ingress": 2, EMBEDDER: 2, GENERATOR: 1}
    deployed(cluster, two_ingresses(base), **replicas)
    with Load(url, embed=2, embed_retrying=2, complete=1) as load:
        load.wait_for(20)
        old = session_processes(cluster.head.session, "haproxy")
        assert old, "no HAProxy in the cluster's session"
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for_condition(lambda: any(o.ok and o.start > killed for o in load.outcomes), timeout=300)
        back = min(o.end for o in load.outcomes if o.ok and o.start > killed)
        load.wait_for(20)
    assert not set(old) & set(session_processes(cluster.head.session, "haproxy")), "HAProxy was not replaced"
    failed = _report("HAProxy SIGKILL", load, served_again_after_s=round(back - killed, 1))
    assert not [o for o in failed if o.kind == "embed_retrying"], failed[:5]
    assert all(_retriable(o) for o in failed), failed[:5]


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(cluster, base, url):
    config = updated(base)
    embedder = deployment(config, EMBEDDER)
    del embedder["num_replicas"]
    # Short delays so the test sees both directions in about a minute; the shipped GPU profile
    # (serve_config.gpu.yaml) uses Serve's defaults. With edge batching an embedder replica sees at
    # most 2 batches at once from each ingress replica, so the target is 1 (README "Autoscaling").
    embedder["autoscaling_config"] = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 1,
        "downscale_delay_s": 5,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2,
    }
    deployed(cluster, config, **{EMBEDDER: 1, GENERATOR: 1})
    with Load(url, embed=16) as load:
        wait_for_condition(lambda: cluster.settled(**{EMBEDDER: 2}), timeout=120, retry_interval_ms=500)
        load.wait_for(16)  # the load that scaled it up was served, not only sent
    wait_for_condition(lambda: cluster.settled(**{EMBEDDER: 1}), timeout=120, retry_interval_ms=500)
    assert len(load.outcomes) >= 16 and {o.kind for o in load.outcomes} == {"embed"}
    assert not load.failures(), load.failures()[:5]
