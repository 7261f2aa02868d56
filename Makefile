# Two commands for a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    := models/demo-kimi-k2-Q4_K_M.gguf
THREADS ?= $(shell nproc)

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	# torch first: a CPU wheel; a bare `torch` requirement would pull CUDA packages
	$(BIN)/pip install -q torch==2.13.0
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(BIN)/pip install -q -e ".[server,dev]"
	touch $(STAMP)

install: $(STAMP)

$(DEMO): $(STAMP) scripts/make_tiny_model.py
	$(BIN)/python scripts/make_tiny_model.py --preset kimi-k2-demo --quant Q4_K_M --out $(DEMO)

demo: $(DEMO)
	$(BIN)/hybrid-runtime inspect $(DEMO)
	$(BIN)/hybrid-runtime generate $(DEMO) -p "Once upon a time" -n 48 --threads $(THREADS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests

bench: $(STAMP)
	THREADS=$(THREADS) ./scripts/run_benchmarks.sh

clean:
	rm -rf $(VENV) models .pytest_cache
