# One-command entry points; each installs the project into .venv first (CPU torch wheel).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# the pin in pyproject.toml
TORCH_VERSION := 2.13.0
TORCH := torch==$(TORCH_VERSION)
# PyPI's torch wheel for Linux pulls several GB of CUDA libraries; the CPU build comes from here,
# unless pip already finds a CPU build itself (a local wheel), or torch is already in the venv.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test lint install

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null \
		|| $(PY) -m pip install --quiet --dry-run --report - "$(TORCH)" 2>/dev/null | grep -q '"version": "$(TORCH_VERSION)+cpu"'; \
	then $(PY) -m pip install --quiet "$(TORCH)"; \
	else $(PY) -m pip install --quiet --index-url "$(TORCH_INDEX)" "$(TORCH)"; fi
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medpipe demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint docker/Dockerfile
	$(VENV)/bin/pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
