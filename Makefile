# The two commands of the README: `make run` (demo) and `make test` (everything CI runs:
# .ci/run is `make test` on a clean clone).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

K8S_VERSION ?= 1.30.0
K8S_FILES := deploy/kubernetes/config.yaml deploy/kubernetes/server.yaml \
	deploy/kubernetes/worker.yaml deploy/kubernetes/snapshot-cronjob.yaml

.PHONY: run test deps lint typecheck structure protos check-protos breaking check-deploy currencies pytest install clean services-down bench

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## Set everything up and run the service with demo data (Ctrl-C stops it).
run: $(STAMP)
	$(PY) scripts/demo.py

## Install the system packages the suite needs (where apt is), lint, type-check, check the
## import structure, generated code, the contract and the deployment files, and run the whole
## test suite on real services.
test: deps lint typecheck structure check-protos breaking check-deploy pytest

## System packages (scripts/install_test_deps.sh: the README lists them).
deps:
	@bash scripts/install_test_deps.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf format --diff --exit-code

typecheck: $(STAMP)
	$(VENV)/bin/mypy

## The import graph: no cycle (function-local imports too), pricing_service's layers, no
## forbidden import, no module over 500 lines without a reason (scripts/check_structure.py).
structure: $(STAMP)
	$(PY) scripts/check_structure.py

protos: $(STAMP)
	PYTHON=$(PY) scripts/gen_protos.sh

check-protos: $(STAMP)
	PYTHON=$(PY) scripts/gen_protos.sh >/dev/null 2>&1
	@git diff --exit-code --stat -- pricing/ || (echo "generated code is stale: run 'make protos' and commit" && exit 1)
	@test -z "$$(git status --porcelain -- pricing/)" || (git status --porcelain -- pricing/ && echo "generated code is stale: run 'make protos' and commit" && exit 1)

## buf breaking against the merge base with main (on main: its previous commit).
breaking: $(STAMP)
	BUF=$(VENV)/bin/buf scripts/check_breaking.sh

## Regenerate the ISO-4217 table from the pinned iso4217 package (checked by a unit test).
currencies: $(STAMP)
	$(PY) scripts/gen_currencies.py

## Alerts (promtool check + unit tests), Prometheus config, Kubernetes manifests (schemas
## shipped by the kubernetes-validate wheel), compose file (compose-spec schema), dashboard.
check-deploy: $(STAMP)
	promtool check rules deploy/prometheus/alerts.yml
	cd deploy/prometheus && promtool test rules alerts.test.yml
	promtool check config deploy/prometheus/prometheus.yml
	$(VENV)/bin/kubernetes-validate -k $(K8S_VERSION) --strict --quiet $(K8S_FILES)
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml
	$(PY) -m json.tool deploy/grafana/crowd-pricing.json >/dev/null

## The whole suite; the image test is required (not skipped) where buildah and debootstrap are.
pytest: $(STAMP)
	eval "$$($(PY) scripts/services.py env)" && \
	if command -v buildah >/dev/null && command -v debootstrap >/dev/null; then \
	  export PRICING_TEST_REQUIRE_IMAGE=1; fi && \
	PRICING_TEST_REQUIRE_SERVICES=1 $(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

services-down:
	$(PY) scripts/services.py down

clean: services-down
	rm -rf $(VENV) .services .demo *.egg-info
