# Two commands do all the set-up on a fresh machine:
#   make demo   - venv, install, run `gradaccum verify` on the built-in example
#   make test   - venv, install (+ OS packages: OpenMPI, Slurm, munge), run the whole suite
#   make bench  - the benchmarks (also installs Accelerate and Lightning, the peers)
#
# TORCH_SPEC picks the torch build installed before the project. The default is the
# CPU wheel; GPU users: make test TORCH_SPEC='torch' (or a CUDA index URL via PIP_EXTRA).
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA  ?=
PYTEST_ARGS ?=
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.gradaccum-installed

.PHONY: demo test test-quick venv os-deps lint bench bench-gpu gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_EXTRA) '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q $(PIP_EXTRA) -e '.[all,test,hf,tensorboard]'
	touch $@

os-deps:
	bash .ci/os-deps.sh

demo: venv
	$(BIN)/gradaccum plan --global-batch-size 24 --micro-batch-size 4 --world-size 2
	$(BIN)/gradaccum verify --output-dir runs/demo

# pytest exit 5 (no tests collected) is a failure, not a pass.
test: os-deps venv lint
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

# No Slurm, MPI or DeepSpeed needed: the tests that need them carry markers (tests/test_markers.py).
test-quick: venv
	$(BIN)/python -m pytest -m "not slow and not slurm and not mpi and not deepspeed" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check launcher trainers tests benchmarks examples

# Benchmarks (not part of the tests): ratios against baselines measured in the same run.
bench: venv
	$(BIN)/python -m pip install -q $(PIP_EXTRA) -e '.[bench]'
	$(BIN)/python -m benchmarks

# On a machine with an NVIDIA GPU (install a CUDA torch: make bench-gpu TORCH_SPEC=torch).
bench-gpu: venv
	$(BIN)/python -m benchmarks --gpu

# The CUDA paths in one go (verify NCCL/gloo/bf16, pinned workers, the GPU benchmark): exit 2 without CUDA.
gpu-check: venv
	$(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
