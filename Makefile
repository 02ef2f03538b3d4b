# cause_lightning developer commands. `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST := WANDB_MODE=disabled HF_HUB_OFFLINE=1 HYDRA_FULL_ERROR=1 $(PY) -m pytest
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-slow test-all lint format pipeline bench clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q "torch==2.14.1" "torchvision==0.29.1" -e ".[crf,dev,slurm,optuna]"
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install the package (editable) with its extras

demo: $(STAMP) ## Run the whole CAUSE pipeline on the embedded default (mosaic data, filterbank backbone)
	WANDB_MODE=$${WANDB_MODE:-disabled} HF_HUB_OFFLINE=1 $(PY) -m cause_lightning stage=all $(ARGS)

test: $(STAMP) ## Fast test suite (no slow tests)
	$(PYTEST) -m "not slow" -q $(ARGS)

test-slow: $(STAMP) ## Slow tests only (CLI subprocesses, DDP, multirun, W&B, notebook)
	$(PYTEST) -m slow -q $(ARGS)

test-all: $(STAMP) ## Every test
	$(PYTEST) -q $(ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP) ## Format the code with ruff
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

pipeline: $(STAMP) ## Run mediator, head, probe, eval as separate stages (pass ARGS="data=... backbone=...")
	for stage in mediator head probe eval; do \
	  $(PY) -m cause_lightning stage=$$stage $(ARGS) || exit $$?; \
	done

bench: $(STAMP) ## CPU cost table vs floors -> benchmarks/results/cpu.json (ARGS="--batch 4" scales it)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) benchmarks/bench.py --threads 2 $(ARGS)

clean: ## Remove run outputs and caches (keeps .venv, data and artifacts)
	rm -rf logs outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
