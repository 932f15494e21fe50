# Every target goes through `setup`, so a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup serve test test-unit test-integration test-e2e clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Foreground, HTTP on 127.0.0.1:8000 (see serve_config.yaml). Ctrl-C stops it.
serve: setup
	$(VENV)/bin/serve run serve_config.yaml

# Two pytest runs: the end-to-end tests start their own `serve run` cluster, which must
# not share a machine-wide Ray session with the integration tests' cluster.
test: setup
	$(PY) -m pytest -q tests/unit tests/integration
	$(PY) -m pytest -q tests/e2e

test-unit: setup
	$(PY) -m pytest -q tests/unit

clean:
	rm -rf $(VENV) .pytest_cache
