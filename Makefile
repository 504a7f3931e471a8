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

.PHONY: install test test-fast test-demo test-chaos test-long demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(CONSTRAINTS) -e '.[dev]'
	touch $@

# Everything that runs without a GPU, the real SLURM cluster included (about 25 minutes on 2 cores).
test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu and not demo and not chaos and not long"

# The quick subset (plain `pytest`): no SLURM cluster, no multi-minute runs.
test-fast: $(STAMP)
	$(PY) -m pytest -q

# The full demo recipes against the published margin (ANN >= 0.80 mIoU, ANN - FCN >= 0.25).
test-demo: $(STAMP)
	$(PY) -m pytest -q -m demo

# Kills random workers of a 2-rank run (DDP and DeepSpeed) under CPU load three times; the run must end
# bitwise equal to an undisturbed one (several minutes each).
test-chaos: $(STAMP)
	$(PY) -m pytest -q -m chaos

# The whole ZeRO-0/1/2 state matrix: every stage and optimizer saved on 2 ranks and loaded on 1, 2 and 3,
# and across stages (test_elastic and test_train cover ZeRO-1/2 resume end to end in `make test`).
test-long: $(STAMP)
	$(PY) -m pytest -q -m long

# Trains ANN and the FCN baseline on the synthetic long-range set (created on first use), evaluates
# both, prints their mIoU side by side and draws their curves and per-class IoU. Everything it writes
# is under runs/ and data/synth/ (both ignored by git). Runs resume, so a second `make demo` only evaluates.
demo: $(STAMP)
	$(ANN) train recipes/demo.yaml
	$(ANN) train recipes/demo-fcn.yaml
	$(ANN) eval recipes/demo.yaml --json runs/demo/metrics.json
	$(ANN) eval recipes/demo-fcn.yaml --json runs/demo-fcn/metrics.json
	$(PY) benchmarks/demo_compare.py runs/demo/metrics.json runs/demo-fcn/metrics.json --out runs/demo-compare.json
	$(ANN) plot runs/demo runs/demo-fcn --out runs/demo-curves.png
	$(ANN) plot runs/demo/metrics.json runs/demo-fcn/metrics.json --out runs/demo-classes.png

bench: $(STAMP)
	$(PY) benchmarks/cli_startup.py
	$(ANN) bench attention --json benchmarks/results/attention.json

# On a machine with one CUDA GPU: attention, ANN-R101 training (fp32 vs bf16 + channels_last), slide-eval
# memory, eval protocol, CLI, compile, DeepSpeed and `pytest -m gpu`, written to benchmarks/results/gpu-<device>.json
# with the targets as fields (under 6 minutes).
# Without CUDA it says so in one line and exits with 2.
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) runs data/synth
