# ppchat: two commands do all the set-up on a fresh machine.
#   make demo   builds the venv and the demo model, chats with the agent, then runs a federated round
#   make test   builds the venv and the demo model, runs ruff, mypy and the tests
SHELL := /bin/bash
PYTHON ?= $(shell for p in python3.11 python3.12 python3.10 python3; do command -v $$p >/dev/null && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ppchat-installed
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
# Debian packages: a compiler and CMake for llama.cpp, Mosquitto for the broker tests,
# systemd-analyze for the unit tests, libsystemd-dev for the journal extra.
# gcc/g++-aarch64-linux-gnu and qemu-user cross-compile llama.cpp for the Pi profiles and run it under
# emulated Cortex-A72/A76 cores (tests/hardware/test_crossbuild.py).
DEB_PACKAGES := build-essential cmake pkg-config git mosquitto mosquitto-clients systemd libsystemd-dev ccache \
	gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user openssl
# llama-cpp-python is compiled; keep pip's wheel cache so reinstalls take seconds.
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint typecheck pytest bench deps venv model clean help

help:
	@echo "make demo   - set up, build the demo model, chat with the agent, run a whole federated round"
	@echo "make test   - set up, then ruff, mypy and the whole test suite"
	@echo "make bench  - print the benchmark ratios"

deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi; \
	else \
	  for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo "note: Debian package $$p is missing (run as root, or: sudo apt-get install $$p)"; done; \
	fi
	@# The packaged Mosquitto service is not used: tests start their own brokers.
	@if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then systemctl disable --now mosquitto >/dev/null 2>&1 || true; fi

venv: $(STAMP)

$(STAMP): pyproject.toml | deps
	@test -n "$(PYTHON)" || { echo "python3 (3.10 or newer) is required"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel setuptools
	@# On x86 install the CPU build of torch first, so that nothing pulls a CUDA build.
	@# Set TORCH_INDEX to a CPU wheel index on machines whose pip would otherwise pick a CUDA build.
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e '.[train,broker,dev]'
	touch $(STAMP)

model: venv
	$(BIN)/agent model build-demo

demo: model
	$(BIN)/python -m agent.demo
	$(BIN)/python -m agent.demo_round

lint: venv
	$(BIN)/ruff check agent coordinator fleet hardware tests bench
	$(BIN)/ruff format --check agent coordinator fleet hardware tests bench

typecheck: venv
	$(BIN)/mypy

pytest: model
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: model
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
