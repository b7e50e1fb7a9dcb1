# emaweights: `make demo` runs the main job, `make test` runs lint, mypy and the
# fast tests (slow ones need PYTEST_ARGS='-m "slow or not slow"'). Both create
# .venv on first use. torch is pinned to the CPU build for dev/CI; the library
# itself requires only the torch floor in pyproject.toml (checked in CI by .ci/floor).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
EXTRAS := dev,bench,lightning,transformers,accelerate,peft,safetensors,bench-anchors

.PHONY: demo test lint typecheck venv clean gpu-check

venv: $(VENV)/.installed

# timm goes in without its torchvision (PyPI builds that for CUDA torch only):
# the migration tests and bench-speed load timm/utils/model_ema.py alone.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" "$(TORCH_PIN)"
	$(PY) -m pip install -q --no-deps timm
	touch $@

demo: venv
	$(VENV)/bin/emaweights demo $(ARGS)

LINTED := src tests $(wildcard examples)

lint: venv
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

typecheck: venv
	$(VENV)/bin/mypy

test: lint typecheck
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-floor build dist .mypy_cache .pytest_cache .ruff_cache

# The CUDA tests and the GPU speed benchmark in one run (<= 8 min); table in build/gpu-check/.
gpu-check:
	scripts/gpu_check.sh
