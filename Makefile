# Every target goes through `setup`, so a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup serve test test-unit bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Foreground, HTTP on 127.0.0.1:8000 (see serve_config.yaml). Ctrl-C stops it.
# HAProxy replaces Serve's Python proxy (README "Operating it"; loadtest/servers.py SERVE_ENV).
serve: setup
	RAY_SERVE_ENABLE_HA_PROXY=1 $(VENV)/bin/serve run serve_config.yaml

# Two pytest runs: the end-to-end tests start their own `serve run` cluster, which must
# not share a machine-wide Ray session with the integration tests' cluster.
test: setup
	$(PY) -m pytest -q tests/unit tests/integration
	$(PY) -m pytest -q tests/e2e

test-unit: setup
	$(PY) -m pytest -q tests/unit

clean:
	rm -rf $(VENV) .pytest_cache

# Side-by-side embeddings benchmark (raw limit, naive peer, rayinfer variants): ~6 minutes.
# Not a test: no assertions on speed. Review artifacts/bench/bench.md, then copy it into BENCHMARKS.md.
bench: setup
	$(PY) -m loadtest.bench
