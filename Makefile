# One-command entry points; each installs the project into .venv first (CPU torch wheel).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# the pin in pyproject.toml ("torch==X")
TORCH_VERSION := $(shell sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
TORCH := torch==$(TORCH_VERSION)
# PyPI's torch wheel for Linux pulls several GB of CUDA libraries; the CPU build comes from here,
# unless the venv has the pinned torch already (any build: a GPU user's CUDA one stays) or pip
# finds a CPU build of it itself (a local wheel).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test lint install

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if $(PY) -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null; \
	then :; \
	elif $(PY) -m pip install --quiet --dry-run --report - "$(TORCH)" 2>/dev/null | grep -q '"version": "$(TORCH_VERSION)+cpu"'; \
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
