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

# gpu-check runs on a bare GPU machine with no network whose Python already has torch >= 2.10 and transformers 5: the
# rest comes from wheels in .whl/ that `make gpu-wheels` downloads beforehand (CPython 3.12, manylinux x86_64).
GPU_PYTHON ?= python3
GPU_SITE ?= /tmp/shardtune-site
GPU_OUT ?= gpu-check
GPU_WHEELS := datasets dill multiprocess draccus mergedeep toml typing-inspect mypy-extensions

.PHONY: install tiny smoke smoke-lora test test-fast test-slurm lint bench bench-load bench-data bench-train gpu-check gpu-wheels clean

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

smoke-lora: install  ## the same with LoRA adapters (recipes/tiny-lora.yaml)
	$(BIN)/python -m launch.smoke --nproc $(NPROC) --recipe recipes/tiny-lora.yaml --output-dir runs/smoke-lora

test: install  ## both tiers: in-process tests, then the multi-process (torchrun, Slurm) ones
	$(BIN)/python -m pytest -q -ra tests

test-fast: install  ## the in-process tier alone (< 60 s): config, schedule, sharding plans, checkpoints, prompts, FLOPs
	$(BIN)/python -m pytest -q -ra -m "not slow and not gpu" tests

test-slurm: install  ## the real-Slurm preemption test alone (root + apt needed)
	$(BIN)/python -m pytest -q -ra tests/test_slurm.py

lint: install  ## ruff: formatting and lint, line length 120 (pyproject.toml)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

bench: bench-train bench-load bench-data  ## every benchmark (each prints a table the README quotes)

bench-train: install  ## tokens/s against a minimal FSDP2 loop and the HF Trainer, alternated rounds; chunked-loss memory
	$(BIN)/python tests/bench/bench_train.py

bench-load: install  ## load memory three ways (every rank, rank 0 + second model, streamed), save and export times
	$(BIN)/python tests/bench/bench_load.py --nproc $(NPROC)

bench-data: install  ## data preparation, old path vs Arrow batches, 2 ranks, 100k and 1M alpaca rows
	$(BIN)/python tests/bench/bench_data.py

gpu-wheels: install  ## download what gpu-check needs beyond torch + transformers into .whl/ (needs network)
	mkdir -p .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    --platform any -d .whl \
	    $$($(BIN)/python -c "import importlib.metadata as m; print(' '.join(f'{n}=={m.version(n)}' for n in '$(GPU_WHEELS)'.split()))")
	@ls .whl

gpu-check:  ## on one H100/H200: GPU tests (pytest -m gpu) and the 1.1B throughput table; refuses without CUDA
	@$(GPU_PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || \
	    { echo "gpu-check: needs a CUDA GPU, and this machine has none (torch.cuda.is_available() is False)" >&2; exit 2; }
	@if ls .whl/*.whl >/dev/null 2>&1; then \
	    $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) .whl/*.whl; fi
	mkdir -p $(GPU_OUT)
	PYTHONPATH=$(GPU_SITE):$(CURDIR) $(GPU_PYTHON) -m pytest -q -ra -m gpu -p no:cacheprovider tests/gpu
	PYTHONPATH=$(GPU_SITE):$(CURDIR) $(GPU_PYTHON) tests/bench/gpu_throughput.py --out $(GPU_OUT)/throughput.json

clean:
	rm -rf $(VENV) runs .pytest_cache
