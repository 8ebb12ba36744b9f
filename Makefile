# The two commands a new machine needs: `make up` (the main job) and `make test` (lint, types, tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install lock up test lint bench bench-llama-server llama-server fuzz llama-cmake-args

# The installer itself is pinned too; everything else comes from the lock.
PIP_VERSION := 26.3
LOCK := requirements/dev.lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install 'pip==$(PIP_VERSION)'

# llama.cpp is compiled for x86-64-v3 (AVX2, FMA, F16C), not for this machine's CPU (-march=native): some VMs'
# CPUs advertise instructions their hypervisor does not run (AMX tiles), which crash a native build with SIGILL,
# and a wheel pip cached on one machine must run on the next. `make llama-cmake-args` prints them (bench/ uses it).
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif

# Every dependency, dev tools included, at the version and hashes in the lock (resolved once by `make lock`, not
# afresh on each install), then llamakit itself, editable, with nothing more.
install: $(BIN)/python
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --require-hashes -r $(LOCK)
	$(BIN)/pip install --no-deps -e .

# Resolve pyproject.toml's llamakit[all,dev] again into the lock (after changing a requirement, or to update): the
# extras of `all` one by one, so that the lock does not name llamakit itself.
lock: $(BIN)/python
	$(BIN)/pip install 'pip-tools>=7.4'
	$(BIN)/pip-compile --quiet --extra node --extra gemma --extra tui --extra notebooks --extra otel --extra dev \
		--generate-hashes --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
		--custom-compile-command "make lock" \
		--output-file $(LOCK) pyproject.toml

llama-cmake-args:
	@echo $(LLAMA_CMAKE_ARGS)

up: install
	$(BIN)/llamakit up

lint:
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

test: install lint
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/node_throughput.py

# llama.cpp's own llama-server (and llama-bench), built once with the flags above from the llama.cpp that the
# installed llama-cpp-python vendors, into ~/.cache/llamakit; prints its path.
llama-server: install
	$(BIN)/python bench/build_llama_server.py

# The node against llama-server: 1, 4 and 8 streams, streamed and whole (add --cold through BENCH_ARGS).
bench-llama-server: install
	$(BIN)/python bench/node_throughput.py --llama-server "$$($(BIN)/python bench/build_llama_server.py)" \
		--engines batched --concurrency 1,4,8 --whole --no-llama --no-bare-batches $(BENCH_ARGS)

# Before a release: the router fuzzed against its own /openapi.json with many more examples than CI's run
# (docs/development.md#the-api-fuzzed-against-its-document). FUZZ_EXAMPLES=2000 FUZZ_SEED=7 make fuzz for more.
FUZZ_EXAMPLES ?= 500
FUZZ_SEED ?= 26
fuzz: install
	LLAMAKIT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) LLAMAKIT_FUZZ_SEED=$(FUZZ_SEED) \
		$(BIN)/pytest -s -q -p no:randomly tests/router/test_openapi_fuzz.py
