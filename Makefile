# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Each creates the project's virtualenv first if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA := data/local
RUN_DIR ?= runs/smoke-$(shell date +%Y%m%d-%H%M%S)

.PHONY: venv data demo test lint

$(BIN)/codemix: setup.py constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,tpu,export,eval]'
	touch $@

venv: $(BIN)/codemix

$(DATA)/corpus/manifest.json: | venv
	$(BIN)/codemix build-corpus --out_dir $(DATA)/corpus

$(DATA)/spm.model: $(DATA)/corpus/manifest.json
	$(BIN)/codemix train-vocab --corpus_dir $(DATA)/corpus --out_path $@ --vocab_size 2048

$(DATA)/instructions/code/ingest_manifest.json: | venv
	$(BIN)/codemix build-instructions --out_dir $(DATA)/instructions

data: $(DATA)/spm.model $(DATA)/instructions/code/ingest_manifest.json

demo: data
	$(BIN)/codemix train --gin_file gin/experiments/smoke.gin --run_dir $(RUN_DIR)

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest
