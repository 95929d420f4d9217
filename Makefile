# Dativo developer entry points. `make` alone lists them.
#
# Every target is safe to run twice: `venv` re-installs only when
# pyproject.toml changes, `engine` returns at once when Docker answers, and
# `images` rebuilds only images whose inputs changed (content-addressed tags).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.dativo-venv-stamp
# Besides `.[dev]`: what integration tests and examples use.
VENV_EXTRAS := pyiceberg testcontainers boto3 cryptography 'psycopg[binary]' psycopg2-binary

PYTEST := $(PY) -m pytest
PYTEST_FLAGS ?=
ifeq ($(CI),true)
PYTEST_FLAGS += -p no:cacheprovider
endif

.PHONY: help venv engine softhsm images services demo test test-rust test-unit test-integration test-security \
	bench lint clean

help: ## List the targets (this text)
	@echo "usage: make TARGET"
	@echo
	@grep -hE '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) \
		| awk 'BEGIN {FS = ":.*## "} {printf "  %-17s %s\n", $$1, $$2}'

venv: $(VENV_STAMP) ## Create .venv and install dativo[dev] + test extras (when pyproject.toml changes)

$(VENV_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]' $(VENV_EXTRAS)
	@touch $@

engine: ## Make sure a Docker engine answers (installs/starts dockerd as root)
	@bash sandbox/engine.sh

softhsm: ## Install SoftHSM2 (the PKCS#11 HSM the key-service tests use) when it is missing
	@command -v softhsm2-util >/dev/null 2>&1 || { \
		echo "installing softhsm2 (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2; }

images: venv engine ## Build the base and plugin images (only what changed)
	@$(PY) sandbox/build_images.py

services: images ## Build the Postgres and S3/KMS (moto) test-service images (only what changed)
	@$(PY) sandbox/build_services.py

demo: images ## Run the quickstart: make example data, then `dativo run` it
	$(PY) examples/quickstart_data.py
	$(VENV)/bin/dativo run examples/quickstart.yaml

test: softhsm images services test-rust ## Run the whole test suite (tests/ and the Rust plugin's cargo tests), images first
	$(PYTEST) $(PYTEST_FLAGS) tests/

# The Rust reader's own unit tests, in the target directory `make images` compiles it into (so
# only the test harness is compiled again).
CARGO_TARGET := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/dativo/cargo-target
CARGO := $(or $(shell command -v cargo 2>/dev/null),$(HOME)/.cargo/bin/cargo)

test-rust: ## Run the unit tests of plugin-images/rust-postgres (cargo test)
	CARGO_TARGET_DIR=$(CARGO_TARGET) PATH="$(dir $(CARGO)):$$PATH" $(CARGO) test --release --locked \
		--manifest-path plugin-images/rust-postgres/Cargo.toml

test-unit: venv softhsm ## Run the unit tests (tests/unit; no engine needed)
	$(PYTEST) $(PYTEST_FLAGS) tests/unit

test-integration: images ## Run the integration tests (tests/integration)
	$(PYTEST) $(PYTEST_FLAGS) tests/integration

test-security: images ## Run the hostile-plugin containment suite (tests/security; builds its fixture images)
	$(PYTEST) $(PYTEST_FLAGS) tests/security

bench: softhsm images services ## Run every benchmark (bench/*.py but not bench/_*.py), one after the other
	@shopt -s nullglob; files=(); \
	for f in bench/*.py; do [[ $$(basename "$$f") == _* ]] || files+=("$$f"); done; \
	if [ $${#files[@]} -eq 0 ]; then echo "bench: no bench/*.py yet"; fi; \
	for f in "$${files[@]}"; do echo "== $$f"; $(PY) "$$f"; done

bench-%: softhsm images ## Run one benchmark: bench/%.py (e.g. make bench-transport)
	@test -f bench/$*.py || { echo "no such benchmark: bench/$*.py" >&2; exit 1; }
	$(PY) bench/$*.py

lint: venv ## ruff check, ruff format --check, mypy src
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy src

clean: ## Remove build/ and tool caches (keeps .venv, images, the base rootfs cache)
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
