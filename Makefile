# Two commands on a fresh machine with Python 3.11+:  make demo  |  make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test demo lint typecheck unit bench clean

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

test: $(BIN)/.installed lint typecheck unit

lint: $(BIN)/.installed
	$(BIN)/ruff check amp_cohorts_async tests benchmarks examples

typecheck: $(BIN)/.installed
	$(BIN)/mypy amp_cohorts_async tests/typing

unit: $(BIN)/.installed
	$(BIN)/pytest -q

demo: $(BIN)/.installed
	$(BIN)/amp-cohorts demo

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/scheduler.py
	$(BIN)/python benchmarks/download.py
	$(BIN)/python benchmarks/upload.py

clean:
	rm -rf $(VENV) build dist *.egg-info
