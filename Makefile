# fedgate — every entry point bootstraps uv and the locked environment itself.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(notdir $(PYTHON))
UV := $(or $(shell command -v uv 2>/dev/null),$(CURDIR)/.tools/bin/uv)
VENV_PY := $(CURDIR)/.venv/bin/python
PYTEST := $(VENV_PY) -m pytest

.PHONY: help env test-env test test-fast soak demo demo-federation demo-shakespeare bench lint openapi clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

$(CURDIR)/.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv

# Two layers of one .venv. What the node and the demos run: the SDK and the node extra, never
# the dev group (inexact: a demo never uninstalls the test tools from a developer's .venv).
# Both compile the installed packages to bytecode: where PYTHONDONTWRITEBYTECODE is set (CI,
# containers) no import writes a .pyc, and every `fedgate` command, gateway and test subprocess
# would compile SQLAlchemy, pydantic, httpx, ... from source again (~0.9 s per command).
.venv/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --locked --extra node --no-dev --inexact --compile-bytecode
	touch $@

# What the tests need on top: the dev group (pytest, Playwright, nbclient, ...), exactly as locked.
.venv/.synced-dev: .venv/.synced
	$(UV) sync --locked --extra node --compile-bytecode
	touch $@

tests/interop/node_modules/.installed: tests/interop/package-lock.json
	cd tests/interop && npm ci --silent --no-audit --no-fund
	touch $@

# Debian's Chromium for the dashboard's browser test; Playwright drives it and never
# downloads a browser of its own. Installed once (the file is the target).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# The audit verifier's compiled RFC 6962 helper: C over OpenSSL's SHA-256, loaded with ctypes
# (ledger/rfc6962_native.py; without it the verifier hashes with hashlib, to the same result).
# `make env` builds it where OpenSSL's headers are installed and goes on without it otherwise
# (the node and the demos run the same, and install nothing with apt-get); the tests need it,
# to compare it with hashlib, so `make test-env` installs Debian's libssl-dev if need be.
NATIVE := ledger/native/_rfc6962.so
OPENSSL_H := /usr/include/openssl/evp.h

$(OPENSSL_H):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev

$(NATIVE): ledger/native/rfc6962.c
	$(CC) -O2 -Wall -Wextra -Werror -shared -fPIC -o $@ $< -lcrypto

env: .venv/.synced ## install uv if missing, sync .venv from uv.lock, build the audit hashing helper if OpenSSL's headers are here
	@$(MAKE) -s --no-print-directory $(NATIVE) 2>/dev/null || echo "note: $(NATIVE) not built (no C compiler or OpenSSL headers): the audit verifier hashes with hashlib, to the same results, slower; make test-env installs what it needs"

test-env: env .venv/.synced-dev tests/interop/node_modules/.installed $(CHROMIUM) $(OPENSSL_H) ## env + the dev group, npm interop packages, Debian's chromium and libssl-dev, the hashing helper
	$(MAKE) -s --no-print-directory $(NATIVE)

test: test-env ## run the full test suite (TFF and PostgreSQL included)
	$(PYTEST) -q --durations=25

test-fast: test-env ## run the tests that do not train with TFF
	$(PYTEST) -q -m "not tff"

soak: test-env ## long concurrency soak: gateways on SQLite and PostgreSQL, ~10 min
	FEDGATE_SOAK=long $(PYTEST) -q -rxs tests/test_soak.py

demo: env ## run the end-to-end demo on a temporary node
	$(VENV_PY) -m gateway.cli demo

demo-federation: env ## train one model across three temporary nodes (cross-silo federation)
	$(VENV_PY) -m gateway.cli demo-federation

demo-shakespeare: env ## fetch Shakespeare per speaker, plan a job at ε 4, train with adaptive clipping
	$(VENV_PY) -m gateway.cli demo-shakespeare

bench: env ## run the benchmarks and update docs/performance.md
	$(VENV_PY) -m bench.run

openapi: env ## regenerate docs/openapi.json from the routes
	$(VENV_PY) -m gateway.api.openapi

lint: env .venv/.synced-dev ## ruff (installs the dev group, not the browser)
	$(VENV_PY) -m ruff check gateway engine ledger tests bench

clean: ## remove the environment and caches
	rm -rf .venv .tools .pytest_cache
