# headwise: every target bootstraps .venv when it is missing, with the versions of constraints.txt.
# CPU-only Linux gets torch==2.13.0 (a CPU wheel); a GPU user overrides: make TORCH_SPEC=torch
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# every pip install of .venv (and of the image) takes its versions from here; `make constraints` rewrites it
PIN := -c constraints.txt
PYTEST_ARGS ?=
# As root (CI) the multi-host harness (tests/multihost, network namespaces) must run: its skip is a failure
MULTIHOST_REQUIRED ?= $(shell [ "$$(id -u)" = 0 ] && echo 1)

.PHONY: help venv model demo test test-fast test-multihost bench bench-quality proto lint clean k8s constraints

help:
	@echo "make demo       run the main job: local cluster answering questions about a real document"
	@echo "make test       run the whole test suite (fast tests, then slow ones: real model, Redis, Ray)"
	@echo "make test-fast  only the fast tests (tiny random models)"
	@echo "make test-multihost  the multi-host harness alone: hosts as network namespaces (root)"
	@echo "make bench      engine benchmark -> bench/results/engine.json"
	@echo "make bench-quality  accuracy vs kept fraction, headwise policies and the kvpress anchor (separate .venv-bench)"
	@echo "make proto      regenerate the gRPC stubs from proto/"
	@echo "make lint       ruff"
	@echo "make k8s        regenerate serveConfigV2 in k8s/ from cluster/serve_config.py; render overlays (kubectl kustomize) to build/k8s/"
	@echo "make constraints  rewrite constraints.txt from the versions .venv resolved (after changing a dependency)"

$(BIN)/.bootstrapped: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet $(PIN) --upgrade pip setuptools
	$(BIN)/pip install --quiet $(PIN) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet $(PIN) --build-constraint constraints.txt -e ".[dev,k8s]"
	touch $@

venv: $(BIN)/.bootstrapped

model: venv
	$(BIN)/headwise model install

demo: venv
	$(BIN)/headwise demo

test: venv
	HEADWISE_MULTIHOST_REQUIRED=$(MULTIHOST_REQUIRED) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-multihost: venv
	HEADWISE_MULTIHOST_REQUIRED=1 $(BIN)/python -m pytest -q tests/multihost $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: venv
	mkdir -p bench/results
	$(BIN)/python -m bench.engine --json bench/results/engine.json
	$(BIN)/python -m bench.kvstore --json bench/results/kvstore.json

bench-quality: venv
	mkdir -p bench/results
	test -x .venv-bench/bin/python || ($(PY) -m venv .venv-bench && .venv-bench/bin/pip install --quiet "$(TORCH_SPEC)" \
	  "kvpress==0.5.5" "transformers>=4.56,<5.3" rich matplotlib && .venv-bench/bin/pip install --quiet --no-deps -e .)
	$(BIN)/pip install --quiet $(PIN) -e ".[bench]"
	.venv-bench/bin/python -m bench.kvpress_anchor --threads 1 --json bench/results/kvpress.json
	$(BIN)/python -m bench.quality --threads 1 --json bench/results/quality.json --kvpress-json bench/results/kvpress.json

proto: venv
	$(BIN)/python -m services.protos.build  # -> services/protos/headwise/v1/*_pb2*.py (imports rewritten)

lint: venv
	$(BIN)/ruff check .

k8s: venv
	$(BIN)/python -m cluster.k8s_render sync
	$(BIN)/python -m cluster.k8s_render write build/k8s

# pyproject's dependencies, extras (bench's included) and build requirement, as .venv resolved them
constraints: venv
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python -m cluster.constraints > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
