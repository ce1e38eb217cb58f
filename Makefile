# Two commands for users: `make demo` and `make test`. Everything else builds on the same venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench docs install clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fmoe demo

test: $(STAMP)
	$(MAKE) lint
	$(BIN)/python -m pytest -q
	$(MAKE) docs

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check fmoe tests tools
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python tools/bench_decode.py

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q

clean:
	rm -rf $(VENV) site .pytest_cache
