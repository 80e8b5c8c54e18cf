# Two commands set up a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-run

.PHONY: demo test install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tcsmae.demo --out $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q --timeout=900 $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/tcsmae bench --quick --out bench/results/cpu-quick-$$(date +%Y-%m-%d).json

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
