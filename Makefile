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
	# train: transformers (the independent oracle of the trained demo model; it pulls no torch)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(BIN)/pip install -q -e ".[server,dev,train]"
	touch $(STAMP)

install: $(STAMP)

CHECKPOINT := $(wildcard assets/kimi-k2-stdlib/*)

# the trained checkpoint (scripts/train_tiny_model.py) exported and quantized: no training here
$(DEMO): $(STAMP) scripts/make_tiny_model.py $(CHECKPOINT)
	$(BIN)/python scripts/make_tiny_model.py --preset kimi-k2-stdlib --quant Q4_K_M --out $(DEMO)

demo: $(DEMO)
	$(BIN)/hybrid-runtime inspect $(DEMO)
	$(BIN)/hybrid-runtime generate $(DEMO) -p "$$(printf 'def parse_header(line):\n    """Split a header line into its name and value."""')" \
		-n 64 --temp 0.5 --top-k 40 --seed 2 --threads $(THREADS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests

bench: $(STAMP)
	THREADS=$(THREADS) ./scripts/run_benchmarks.sh

clean:
	rm -rf $(VENV) models .pytest_cache
