# shardtune: `make smoke` fine-tunes the tiny model end to end on CPU; `make test` runs the whole suite.
# The torch requirement lives in one variable: the pin installs a CPU build here and a CUDA build on a GPU machine.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
NPROC ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= offline

.PHONY: install tiny smoke test test-slurm bench bench-load clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/pip install -q "$(TORCH)" 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/pip install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -c "import torch, transformers, draccus, datasets, wandb; print('installed torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $@

install: $(STAMP)

tiny: install  ## build the offline tiny LLaMA-2 and the bundled data into the cache
	$(BIN)/python -m backbones.tiny
	$(BIN)/python -m launch.bundled_data

smoke: install  ## 2-process torchrun full fine-tune of the tiny model on CPU, before/after eval, generation
	$(BIN)/python -m launch.smoke --nproc $(NPROC)

test: install
	$(BIN)/python -m pytest -q -ra tests

test-slurm: install  ## the real-Slurm preemption test alone (root + apt needed)
	$(BIN)/python -m pytest -q -ra tests/test_slurm.py

bench: bench-load

bench-load: install  ## rank-0 load + broadcast vs every-rank-loads, save and export times (>= 300M params)
	$(BIN)/python tests/bench/bench_load.py --nproc $(NPROC)

clean:
	rm -rf $(VENV) runs .pytest_cache
