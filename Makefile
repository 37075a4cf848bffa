# The two commands a newcomer runs: `make demo` and `make test`. Both build .venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo bench clean-demo

$(STAMP): requirements-dev.txt setup.py
	python3 -m venv $(VENV)
	# torch first, pinned: the CPU build is found locally, so nothing pulls CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	bash launcher/demo.sh

clean-demo:
	rm -rf runs/demo
