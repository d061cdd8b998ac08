# The two commands a newcomer needs: `make run` and `make test`.
# Everything else here is a helper they use.

PYTHON ?= python3
VENV ?= .venv
# A CPU build of this version lies on the development machines' disk; elsewhere pip fetches it.
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install lint format clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

## run: the whole service locally (redis-server, API, one worker, janitor) on the default model
run: $(STAMP)
	@exec $(PY) scripts/run_local.py

## test: the whole suite; the tests start their own redis-server and processes
test: $(STAMP)
	@scripts/ensure_test_tools.sh
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
