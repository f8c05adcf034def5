# The two commands of the README: `make demo` and `make test`.
# Both create .venv and install the project on first use (about 3 minutes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export NO_MKDOCS_2_WARNING := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo demo-once test lint docs docs-serve constraints install clean browser

# Every dependency at the exact version of constraints.txt (regenerate it with `make constraints`).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Train on the bundled digits, register in MLflow, index 2 shards, serve on 127.0.0.1:8000 until Ctrl-C.
demo: $(STAMP)
	$(BIN)/retrieval demo --summary demo-summary.json

## The same flow without staying up.
demo-once: $(STAMP)
	$(BIN)/retrieval demo --once --summary demo-summary.json

# The search page's browser test drives Debian's chromium through its chromedriver.
BROWSER := /usr/bin/chromium /usr/bin/chromedriver
$(BROWSER):
	@command -v apt-get >/dev/null || { echo "install chromium and chromium-driver for the browser test"; exit 1; }
	apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null || \
	  { apt-get update >/dev/null && apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null; }

browser: $(BROWSER)

LINTED := platform tests benchmarks docs/hooks tools

## Lint, type-check, build the docs strictly and run the whole test suite (what CI runs).
test: $(STAMP) $(BROWSER)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/mypy
	$(BIN)/lint-imports

## The documentation site (MkDocs) in site/; `make docs-serve` serves it on 127.0.0.1:8001 with live reload.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

docs-serve: $(STAMP)
	$(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

## Rewrite constraints.txt from the venv's versions (after installing a new or upgraded dependency into it).
constraints:
	@test -x $(BIN)/python || { echo "no $(VENV): run make install first"; exit 2; }
	$(BIN)/python tools/constraints.py --python $(BIN)/python --out constraints.txt

## Lint, type-check and every test that starts no Ray Train/Tune run and kills no node (a few minutes).
## The markers come from the fixtures each test uses (tests/conftest.py: FIXTURE_MARKS).
.PHONY: test-fast
test-fast: $(STAMP) $(BROWSER)
	$(BIN)/ruff check platform tests
	$(BIN)/mypy
	$(BIN)/pytest -m "not train_run and not faults"

clean:
	rm -rf $(VENV) mlflow.db mlruns ray_results indices demo-summary.json site
