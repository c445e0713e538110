# Two commands do everything: `make demo` (the main job on the embedded model) and `make test`.
# Both create the virtual environment and install on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all test-llamacpp bench clean

setup: $(STAMP)

# torch is installed first, alone, pinned by constraints.txt, so no other package can pull in a
# multi-GB CUDA build. TORCH_INDEX picks the wheel flavour (README: CPU-only or CUDA machines).
TORCH_INDEX ?=
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -c constraints.txt -e '.[test,eval,export]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/finetune train

test: $(STAMP)
	$(BIN)/python -m pytest -q

# llama.cpp reads our GGUF exports back. llama-cpp-python compiles on install (10-19 min on 2 cores; pip
# caches the wheel afterwards), so these tests have their own target.
test-llamacpp: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,export,llamacpp]'
	$(BIN)/python -m pytest -q -m llamacpp

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

# CPU benchmarks (data, generation, training throughput, memory), each in its own process; one table.
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/run_all.py

clean:
	rm -rf outputs multirun .pytest_cache build *.egg-info
