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
SIMD_STAMP  := $(VENV)/.pillow-simd-tried
PYTEST_ARGS ?=
WHEELHOUSE  ?= wheelhouse
GPU_VENV    ?= .venv-gpu
GPU_CHECK_BUDGET ?= 480
GPU_CHECK_ARGS ?=
# Python writes the bytecode of what it imports into the venv the first time, so each later process (a Ray worker,
# a job CLI) starts from it. Images that set PYTHONDONTWRITEBYTECODE (many CI images do) would otherwise make every
# process compile Ray, MLflow and DeepSpeed from source at each start: the suite's process-heavy tests ran ~2x slower.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test install clean-venv bench gpu-check gpu-check-offline gpu-check-run wheelhouse

demo: $(SIMD_STAMP)
	$(PY) jobs/demo.py

# Two pytest-xdist workers, one per core: the end-to-end tests that share the Ray head in one, those that need an
# MLflow server or start their own services in the other, the rest spread over both (tests/conftest.py).
# TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

install: $(SIMD_STAMP)

bench: $(SIMD_STAMP)
	$(PY) bench/models.py

# It learns: RN and LBAM trained ~20 min each on the CPU through the real path (shard job, Ray Train + DeepSpeed,
# MLflow), then compared on held-out images with their untrained selves, a mean-colour fill and OpenCV's Telea
# (bench/convergence.py; README "It learns"). LEARN_ARGS e.g. "--only rn" or "--set rn:train.max_steps=50".
LEARN_ARGS ?=
.PHONY: learn
learn: $(SIMD_STAMP)
	$(PY) -c "import cv2, sys; sys.exit(cv2.__version__.split('.')[0] != '4')" 2>/dev/null || $(PY) -m pip install -q "opencv-python-headless>=4.8,<5"
	$(PY) bench/convergence.py $(LEARN_ARGS)

# torch comes from pip (TORCH_SPEC: pip finds the CPU wheel on this disk or the CUDA index given); the rest from uv,
# which resolves and downloads in parallel (measured on a 2-core VM, cold caches: 13 s against pip's 141 s), with
# pip as the fallback. Nothing is compiled to bytecode at install (pip --no-compile; uv never does): compiling all
# 22,000 files of the venv took 60 s on 2 cores, and pip spent 30 of its 42 s on torch doing it; the processes
# compile the ~5,000 files they import, once (see unexport above).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	$(PY) -m pip install -q --no-compile $(TORCH_SPEC)
	$(PY) -m uv pip install -q --python $(PY) -e ".[test]" || $(PY) -m pip install -q --no-compile -e ".[test]"
	touch $(STAMP)

# pillow-simd (the same PIL API with AVX2 resize kernels) replaces Pillow for everything but the test suite: its
# wheel compiles from source in 77 s on 2 cores, more than the rest of the install, and the suite checks behaviour
# that both builds share (tests/test_imageops.py names which one ran). Re-run after every install: installing a
# Pillow dependant puts Pillow back.
$(SIMD_STAMP): $(STAMP) infra/install_pillow_simd.sh
	bash infra/install_pillow_simd.sh $(PY)
	touch $(SIMD_STAMP)

# The GPU proof, sized to a lease: bench/gpu_check.py runs the essential rows (RN and LBAM, batch 16, bf16), the
# `gpu` tests, then the rest of the table, each section skipped with a note once GPU_CHECK_BUDGET seconds (all in)
# are spent; rows land in bench/results/gpu-check-DATE-GPU/ as they are measured. Needs a CUDA torch in the venv,
# e.g. make gpu-check TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
gpu-check: $(SIMD_STAMP)
	$(MAKE) --no-print-directory gpu-check-run PY=$(PY)

# On an air-gapped GPU host whose python3 (a venv is fine) has a CUDA torch and infra/gpu/host_packages.txt, with a
# wheelhouse built elsewhere by `make wheelhouse` and copied to $(WHEELHOUSE): infra/gpu/offline_install.py checks
# the host (CUDA torch, what the wheelhouse assumes), makes $(GPU_VENV) seeing the host's packages, installs the
# wheelhouse without an index, then the same check (the Ray Train test is skipped without Ray).
gpu-check-offline:
	$(PYTHON) infra/gpu/offline_install.py --wheelhouse $(WHEELHOUSE) --venv $(GPU_VENV)
	$(MAKE) --no-print-directory gpu-check-run PY=$(GPU_VENV)/bin/python

gpu-check-run:
	$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch ' + torch.__version__ + ' sees no CUDA GPU (install a CUDA build of torch)')"
	$(PY) bench/gpu_check.py --budget $(GPU_CHECK_BUDGET) $(GPU_CHECK_ARGS)

# DeepSpeed (pure Python, DS_BUILD_OPS=0) + what the GPU path needs that the host image (infra/gpu/host_packages.txt)
# lacks, for CPython 3.12, <= 64 MiB. WHEELHOUSE_ADD="numpy ..." packs packages a host lacks although listed.
wheelhouse: $(STAMP)
	PYTHON=$(PY) bash infra/gpu/build_wheelhouse.sh $(WHEELHOUSE)

clean-venv:
	rm -rf $(VENV)
