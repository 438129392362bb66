# The two set-up commands of the README:
#   make demo   creates .venv if needed, installs holefill, runs the whole pipeline on the embedded default
#   make test   creates .venv if needed, installs holefill with test extras, runs the test suite
# TORCH_SPEC picks the torch build: the default is the CPU wheel; on CUDA machines use e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.holefill-installed
PYTEST_ARGS ?=

.PHONY: demo test install clean-venv bench

demo: $(STAMP)
	$(PY) jobs/demo.py

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

install: $(STAMP)

bench: $(STAMP)
	$(PY) bench/models.py

$(STAMP): pyproject.toml infra/install_pillow_simd.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	bash infra/install_pillow_simd.sh $(PY)
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
