# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv (Python 3.11, torch pinned to the CPU build on disk) when missing.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-stamp
# torch==2.13.0 comes from pip's configured indexes: the CPU build where pip is set up to find it
# (our machines), else PyPI's CUDA build (several GB). TORCH_INDEX=<PyTorch's CPU wheel index> asks
# pip to look there too, where it finds the smaller CPU build.
TORCH_INDEX ?=
# pip's offline index locations that are absent on some machines only add noise
PIPQUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: venv demo test test-fast lint bench clean-state

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip 2>&1 | $(PIPQUIET)
	$(VENV)/bin/python -m pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -e '.[test]' 2>&1 | $(PIPQUIET)
	@touch $(STAMP)

venv: $(STAMP)

demo: venv  ## the retrain flow on the embedded defaults, demo scale (FORCE=1 recomputes every step)
	$(VENV)/bin/python -m flows.retrain $(if $(FORCE),--force)

lint: venv  ## ruff, with the rule set in pyproject.toml
	$(VENV)/bin/ruff check .

test: lint  ## the whole test suite (what CI runs)
	$(VENV)/bin/python -m pytest -q

test-fast: venv  ## everything but the tests marked slow (Ray worker groups, servers, whole flows)
	$(VENV)/bin/python -m pytest -q -m "not slow"

bench: venv  ## data-step timings (JSON)
	$(VENV)/bin/python bench/data_steps.py

clean-state:  ## forget local runs and state (data/ stays: it is DVC's)
	rm -rf .skyeye mlruns/mlflow.db mlruns/artifacts
