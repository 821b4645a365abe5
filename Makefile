# Two entry points for a fresh machine: `make demo` (set up, encode + decode a sample RAW) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test setup bench clean

$(BIN)/rcam: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: this exact version installs from the local wheel cache on the project machines.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	# the cluster extra too: tests/test_cluster.py starts a local Dask cluster.
	$(BIN)/pip install -q -e '.[test,cluster]'
	touch $(BIN)/rcam

setup: $(BIN)/rcam

demo: setup
	$(BIN)/rcam demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/bench_codec.py

clean:
	rm -rf out .pytest_cache
