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
WHEELHOUSE  ?= wheelhouse
GPU_VENV    ?= .venv-gpu
GPU_CHECK_ARGS ?=

.PHONY: demo test install clean-venv bench gpu-check gpu-check-offline gpu-check-run wheelhouse

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

# The GPU proof: every `gpu`-marked test, then the throughput / MFU table (bench/gpu_check.py). Needs a CUDA
# torch in the venv, e.g. make gpu-check TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
gpu-check: $(STAMP)
	$(MAKE) gpu-check-run PY=$(PY)

# On an air-gapped GPU host with Python + a CUDA torch + torchvision, numpy, pillow, pytest and a wheelhouse
# built elsewhere by `make wheelhouse` (copied to $(WHEELHOUSE)): a venv that sees the system packages, the
# wheelhouse installed without any index, then the same check (the Ray Train part is skipped without Ray).
gpu-check-offline:
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --no-index --find-links $(WHEELHOUSE) -r $(WHEELHOUSE)/requirements.txt
	$(MAKE) gpu-check-run PY=$(GPU_VENV)/bin/python

gpu-check-run:
	$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch ' + torch.__version__ + ' sees no CUDA GPU (install a CUDA build of torch)')"
	$(PY) -m pytest -m gpu -rs -q -p no:cacheprovider tests/gpu
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

# DeepSpeed (pure Python, DS_BUILD_OPS=0) + the light dependencies for CPython 3.12, <= 64 MiB.
wheelhouse: $(STAMP)
	PYTHON=$(PY) bash infra/gpu/build_wheelhouse.sh $(WHEELHOUSE)

clean-venv:
	rm -rf $(VENV)
