# Two commands on a fresh machine (README): `make demo` runs the main job on a small embedded
# default, `make test` runs the tests. Both set everything up first; set-up is cached.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := out/demo-small-relu-f16.gguf

.PHONY: setup demo test clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Fetch the pinned llama-cpp-python sdist, apply patches/, build patched + stock llama.cpp
# (cached under ~/.cache/powerinfer_gguf), install llama-cpp-python over our libllama, then us.
setup: $(BIN)/python
	$(BIN)/python -m powerinfer_gguf.build setup
	$(BIN)/python -m pip install -q -e '.[test]'

demo: setup
	$(BIN)/pi-synth $(DEMO) --preset small --outtype f16
	$(BIN)/pi-info $(DEMO)
	$(BIN)/pi-bench $(DEMO) --vram-budget 0 -p 64 -n 64 -r 3 --json out/demo-bench.json --plot out/demo-bench.png

test: setup
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
