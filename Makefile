# The two commands of the README: `make run` (demo) and `make test` (everything CI runs).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck protos check-protos breaking currencies pytest install clean services-down bench

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## Set everything up and run the service with demo data (Ctrl-C stops it).
run: $(STAMP)
	$(PY) scripts/demo.py

## Lint, type-check, check generated code, and run the whole test suite against real services.
test: lint typecheck check-protos breaking pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf format --diff --exit-code

typecheck: $(STAMP)
	$(VENV)/bin/mypy

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

pytest: $(STAMP)
	eval "$$($(PY) scripts/services.py env)" && \
	PRICING_TEST_REQUIRE_SERVICES=1 $(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

services-down:
	$(PY) scripts/services.py down

clean: services-down
	rm -rf $(VENV) .services .demo *.egg-info
