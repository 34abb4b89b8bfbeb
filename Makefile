# aqcf — every target creates the virtual environment on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
AQCF := $(VENV)/bin/aqcf
CONFIG ?= configs/lits_atlas.yaml
FOLDS ?= 0 1 2 3 4
RUNS ?= runs
export WANDB_MODE ?= offline

.PHONY: help venv test test-full lint demo bench cv clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed  ## create .venv and install torch==2.13.0 (CPU) and aqcf[dev]

test: venv  ## run the test suite (no slow tests)
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile

test-full: venv  ## run every test, the slow ones too
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: venv  ## ruff
	$(VENV)/bin/ruff check aqcf tests benchmarks

demo: venv  ## model summary (grows into the full phantom demo)
	$(AQCF) summary

bench: venv  ## benchmarks -> benchmarks/results.json and benchmarks/results.md
	$(PY) benchmarks/run.py --out benchmarks/results

clean:  ## remove the venv and generated outputs
	rm -rf $(VENV) runs demo_out .pytest_cache
