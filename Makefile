# Two commands for users: `make demo` and `make test`. Everything else builds on the same venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench docs install clean

# PyTorch's CPU build first, from its own index: PyPI's torch is a CUDA build of several GB, whose
# Triton pin clashes with requirements.txt's. A machine that cannot reach that index (or has the
# wheel at hand) takes requirements.txt's pin as it resolves there.
TORCH_PIN := $(shell sed -n 's/^torch==//p' requirements.txt)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --retries 0 --timeout 20 --index-url $(TORCH_CPU_INDEX) \
		"torch==$(TORCH_PIN)" || echo "make: PyTorch's CPU index not reached; torch comes from requirements.txt"
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
