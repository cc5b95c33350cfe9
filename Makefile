# jobwatch developer commands. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
CLUSTER_DIR ?= $(CURDIR)/.cache/cluster
export JOBWATCH_CLUSTER_DIR := $(CLUSTER_DIR)

.PHONY: help venv binaries cluster cluster-down cluster-status demo demo-down test test-unit test-e2e lint bench bench-overload bench-smoke soak

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev,bench]'
	touch $@

venv: $(VENV)/.installed ## create the Python virtualenv with every dependency

binaries: ## build (or reuse) the pinned etcd, kube-apiserver, kube-controller-manager and kubectl
	@hack/build-controlplane.sh

cluster: ## start the local control plane; admin kubeconfig in .cache/cluster/admin.kubeconfig
	@hack/cluster-up.sh

cluster-down: ## stop the local control plane, leaving no process behind
	@hack/cluster-down.sh

cluster-status: ## say whether the local control plane runs
	@if [[ -f $(CLUSTER_DIR)/apiserver.pid ]] && kill -0 $$(cat $(CLUSTER_DIR)/apiserver.pid) 2>/dev/null; then \
	  echo "running; kubeconfig: $(CLUSTER_DIR)/admin.kubeconfig"; else echo "not running"; exit 1; fi

demo: venv ## the main job: control plane + operator + demo job service + a JobWatch, watched to the end
	@hack/demo.sh

demo-down: ## stop everything `make demo` started
	@hack/demo.sh --down

lint: venv ## ruff, mypy, the layer contracts (import-linter) and hadolint
	$(VENV)/bin/ruff check operator tests bench demo
	$(VENV)/bin/ruff format --check operator tests bench demo
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/hadolint Dockerfile

test: venv lint ## the whole suite: lint, unit tests, e2e tests on a local control plane (or KUBECONFIG, see README)
	hack/test.sh

test-unit: venv ## unit tests only (no cluster)
	$(VENV)/bin/pytest -m 'not e2e' tests

test-e2e: venv ## e2e tests only
	hack/test.sh -m e2e

bench: venv ## the scale benchmark: 100, 200, 1k, 5k and 10k JobWatches on one job service host, default settings (~18 min; docs/benchmarks.md)
	$(PY) bench/scale.py --sizes 100,200,1000,5000,10000

bench-overload: venv ## 10k JobWatches at twice the sustainable poll rate (~5 min)
	$(PY) bench/scale.py --overload --sizes 10000

bench-smoke: venv ## a small run of the scale benchmark, to check the harness works
	$(PY) bench/scale.py --smoke

soak: venv ## 1,000 JobWatches, 30 min of churn: memory, tasks, poll timing (~35 min)
	$(PY) bench/soak.py
