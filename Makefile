# Two commands on a fresh machine (README): `make demo` runs the main job on a small embedded
# default, `make test` runs the tests. Both set everything up first; set-up is cached.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := out/demo

.PHONY: setup demo test clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Fetch the pinned llama-cpp-python sdist, apply patches/, build patched + stock llama.cpp
# (cached under ~/.cache/powerinfer_gguf), install llama-cpp-python over our libllama, then us.
setup: $(BIN)/python
	$(BIN)/python -m powerinfer_gguf.build setup
	$(BIN)/python -m pip install -q -e '.[test]'

# The main job on a small embedded default: a synthetic ReLU LLaMA as an HF checkpoint (real
# llama vocabulary from the sdist) -> pi-convert (profile on Python's own docs, predictors, ranked
# neurons, our GGUF + stock twin) -> pi-info -> pi-bench: ours (sparse) against stock on the twin.
demo: setup
	$(BIN)/pi-synth $(DEMO)-synth.gguf --preset small --outtype f16 --hf $(DEMO)-hf --force
	$(BIN)/pi-convert $(DEMO)-hf -o $(DEMO).pi.gguf --stock $(DEMO).stock.gguf --force
	$(BIN)/pi-info $(DEMO).pi.gguf
	$(BIN)/pi-bench $(DEMO).pi.gguf --stock $(DEMO).stock.gguf --vram-budget 0 -p 64 -n 64 -r 3 --json $(DEMO)-bench.json --plot $(DEMO)-bench.png --force

test: setup
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
