# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
DEMO_DIR ?= results/demo
DEMO_DATA ?= datasets/phantom
DEMO_CMR_DIR ?= results/demo-cmr
DEMO_GEN_DIR ?= results/demo-generator
DEMO_GENAUG_DIR ?= results/demo-genaug
DEMO_BASELINES_DIR ?= results/demo-baselines
DATA ?=
PYTEST_ARGS ?=

.PHONY: install demo demo-generator demo-genaug demo-baselines demo-cmr demo-cmr-data test clean-demo

install: $(STAMP)

# torch first: a pinned CPU build where this machine has one on disk, so that the range in
# setup.py is already satisfied and pip pulls no second (CUDA) build.
$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0 || $(BIN)/python -m pip install -q torch
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/python tools/demo.py --data $(DEMO_DATA) --out $(DEMO_DIR)

# the generator on the phantom CT: samples, their quality, and its UNet as SD-FSMIS's prior at an
# equal CPU budget against a random UNet (reuses make demo's data, VAE and generator)
demo-generator: $(STAMP)
	$(BIN)/python tools/demo_generator.py --data $(DEMO_DATA) --out $(DEMO_GEN_DIR)

# synthetic data on the demo SD-FSMIS: synthetic training episodes, enlarged supports and supports
# generated from masks alone, each against the same model without it (reuses make demo's cache)
demo-genaug: $(STAMP)
	$(BIN)/python tools/demo_genaug.py --data $(DEMO_DATA) --out $(DEMO_GENAUG_DIR)

# PANet, SSL-ALPNet, ADNet and UniverSeg on the phantom, each at the demo SD-FSMIS's wall-clock training
# budget, in make demo's report format (reuses make demo's data, and its SD-FSMIS run when present)
demo-baselines: $(STAMP)
	$(BIN)/python tools/demo_baselines.py --data $(DEMO_DATA) --out $(DEMO_BASELINES_DIR)

# the demo recipe on the real Card-MRI: DATA = the published folder (cmr_MR_normalized/ and
# supervoxels_1000/) or a folder holding it
demo-cmr: demo-cmr-data $(STAMP)
	$(BIN)/python tools/demo_cmr.py --data "$(DATA)" --out $(DEMO_CMR_DIR)

demo-cmr-data:
	@test -n "$(DATA)" || { echo "usage: make demo-cmr DATA=<folder of cmr_MR_normalized>" >&2; exit 2; }

test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 tests $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_DIR) $(DEMO_DATA)
