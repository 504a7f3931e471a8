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

.PHONY: install test test-fast test-demo test-chaos test-long test-oldest test-newest demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(CONSTRAINTS) -e '.[dev]'
	touch $@

# Everything that runs without a GPU, the real SLURM cluster included. Two pytest workers, one test file
# each at a time (a file's module fixtures, such as a trained tiny run, are built once).
PARALLEL ?= -n 2 --dist loadfile
test: $(STAMP)
	$(PY) -m pytest -q $(PARALLEL) --durations=25 -m "not gpu and not demo and not chaos and not long"

# The quick subset (plain `pytest`): no SLURM cluster, no multi-minute runs.
test-fast: $(STAMP)
	$(PY) -m pytest -q $(PARALLEL)

# The declared ranges of pyproject.toml, at both ends: a venv with the oldest release of each direct dependency
# (constraints/oldest.py pins the `>=` floors; their own dependencies resolve as pip likes), and one with the
# newest releases (torch stays the CPU build without CUDA). Each runs LANE: every command's --help, recipes,
# a train killed and resumed, eval, data pack, weights import (the peer fixtures), export.
LANE := tests/cli tests/test_recipe.py tests/data/test_data_pack.py tests/models/test_attention_fused.py \
	tests/interop/test_weights.py tests/interop/test_export.py \
	tests/eval/test_eval_run.py::test_single_process_report_json_and_predictions \
	tests/train/test_train.py::test_single_process_loss_falls_checkpoints_and_resume \
	"tests/train/test_train.py::test_sigkill_then_restart_is_bitwise_identical[1-0-0]"
OLDEST := .venv-oldest
NEWEST := .venv-newest

# DeepSpeed's older releases are source-only, and their setup imports torch when DS_ACCELERATOR=cpu (which is
# not installed yet while pip builds them): the install runs without it.
$(OLDEST)/.installed: pyproject.toml constraints/oldest.py
	rm -rf $(OLDEST)
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet packaging
	$(OLDEST)/bin/python constraints/oldest.py > $(OLDEST)/pins.txt
	env -u DS_ACCELERATOR $(OLDEST)/bin/python -m pip install --quiet -c $(OLDEST)/pins.txt -e '.[test,tensorboard,plot,export,voc]'
	touch $@

test-oldest: $(OLDEST)/.installed
	TORCH_EXTENSIONS_DIR=$(abspath $(OLDEST))/torch_extensions $(OLDEST)/bin/python -m pytest -q -p no:cacheprovider $(PARALLEL) $(LANE)

test-newest:
	rm -rf $(NEWEST)
	$(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install --quiet --upgrade $(if $(CONSTRAINTS),torch==$(shell grep '^torch==' constraints/cpu.txt | cut -d= -f3)) -e '.[test,tensorboard,plot,export,voc]'
	TORCH_EXTENSIONS_DIR=$(abspath $(NEWEST))/torch_extensions $(NEWEST)/bin/python -m pytest -q -p no:cacheprovider $(PARALLEL) $(LANE)

# The full demo recipes against the published margin (ANN >= 0.80 mIoU, ANN - FCN >= 0.25).
test-demo: $(STAMP)
	$(PY) -m pytest -q -m demo

# Kills random workers of a 2-rank run (DDP and DeepSpeed) under CPU load three times; the run must end
# bitwise equal to an undisturbed one (several minutes each).
test-chaos: $(STAMP)
	$(PY) -m pytest -q -m chaos

# The whole ZeRO-0/1/2 state matrix: every stage and optimizer saved on 2 ranks and loaded on 1, 2 and 3 (and a NaN
# gradient on one rank of ZeRO-2 skipping the step on both; ZeRO-1 runs in `make test`),
# and across stages (test_elastic and test_train cover ZeRO-1/2 resume end to end in `make test`), and a
# compiled training run resumed, evaluated and exported (minutes of compilation on 2 cores).
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
