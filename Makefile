# `make demo` and `make test` set everything up on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
ANN := $(VENV)/bin/ann
STAMP := $(VENV)/.installed
# Without CUDA, pin the CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
CONSTRAINTS := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints/cpu.txt)
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export DS_ACCELERATOR ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)

.PHONY: install test test-slow demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(CONSTRAINTS) -e '.[dev]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(PY) -m anncli.demo

bench: $(STAMP)
	$(PY) benchmarks/cli_startup.py
	$(ANN) bench attention --json benchmarks/results/attention.json

clean:
	rm -rf $(VENV) runs data/synth
