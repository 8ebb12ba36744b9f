# The two commands a new machine needs: `make up` (the main job) and `make test` (lint, types, tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install up test lint bench bench-llama-server llama-server llama-cmake-args

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# llama.cpp is compiled for x86-64-v3 (AVX2, FMA, F16C), not for this machine's CPU (-march=native): some VMs'
# CPUs advertise instructions their hypervisor does not run (AMX tiles), which crash a native build with SIGILL,
# and a wheel pip cached on one machine must run on the next. `make llama-cmake-args` prints them (bench/ uses it).
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif

install: $(BIN)/python
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -e '.[all,dev]'

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
