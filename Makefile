# Two commands do everything: `make demo` (the main job on the embedded model) and `make test`.
# Both create the virtual environment and install on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

# torch is installed first, alone, pinned by constraints.txt, so no other package can pull in a
# multi-GB CUDA build. TORCH_INDEX picks the wheel flavour (README: CPU-only or CUDA machines).
TORCH_INDEX ?=
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -c constraints.txt -e '.[test,eval]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/finetune train

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

clean:
	rm -rf outputs multirun .pytest_cache build *.egg-info
