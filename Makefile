# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA    ?= ./data

.PHONY: demo test test-slow bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/shardflow demo --data $(DATA)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python bench/append.py
	$(BIN)/python bench/append_latency.py
	$(BIN)/python bench/listen_poll.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy storage flows connectors

clean:
	rm -rf $(VENV) $(DATA) .pytest_cache
