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
GPU_CHECK_BUDGET ?= 480
GPU_CHECK_ARGS ?=

.PHONY: demo test install clean-venv bench gpu-check gpu-check-offline gpu-check-run wheelhouse

demo: $(STAMP)
	$(PY) jobs/demo.py

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

install: $(STAMP)

bench: $(STAMP)
	$(PY) bench/models.py

# It learns: RN and LBAM trained ~20 min each on the CPU through the real path (shard job, Ray Train + DeepSpeed,
# MLflow), then compared on held-out images with their untrained selves, a mean-colour fill and OpenCV's Telea
# (bench/convergence.py; README "It learns"). LEARN_ARGS e.g. "--only rn" or "--set rn:train.max_steps=50".
LEARN_ARGS ?=
.PHONY: learn
learn: $(STAMP)
	$(PY) -c "import cv2" 2>/dev/null || $(PY) -m pip install -q opencv-python-headless
	$(PY) bench/convergence.py $(LEARN_ARGS)

# torch comes from pip (TORCH_SPEC: pip finds the CPU wheel on this disk or the CUDA index given); the rest from uv,
# which resolves and downloads in parallel (measured on a 2-core VM, cold caches: 13 s against pip's 141 s), with
# pip as the fallback. pillow-simd's wheel compiles (~35 s) while those downloads run. --compile-bytecode: pip writes
# .pyc files at install, uv does not, and where PYTHONDONTWRITEBYTECODE is set (CI images) every process would then
# compile Ray, MLflow and DeepSpeed from source at each start: the suite's process-heavy tests ran ~2x slower.
$(STAMP): pyproject.toml infra/install_pillow_simd.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	bash infra/install_pillow_simd.sh $(PY) --build-only > $(VENV)/pillow-simd-build.log 2>&1 & simd=$$!; \
	  $(PY) -m pip install -q $(TORCH_SPEC) \
	  && { $(PY) -m uv pip install -q --compile-bytecode --python $(PY) -e ".[test]" || $(PY) -m pip install -q -e ".[test]"; }; \
	  status=$$?; wait $$simd; exit $$status
	bash infra/install_pillow_simd.sh $(PY)
	touch $(STAMP)

# The GPU proof, sized to a lease: bench/gpu_check.py runs the essential rows (RN and LBAM, batch 16, bf16), the
# `gpu` tests, then the rest of the table, each section skipped with a note once GPU_CHECK_BUDGET seconds (all in)
# are spent; rows land in bench/results/gpu-check-DATE-GPU/ as they are measured. Needs a CUDA torch in the venv,
# e.g. make gpu-check TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
gpu-check: $(STAMP)
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
