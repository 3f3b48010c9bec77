# The two commands a new user runs on a fresh machine:
#   make demo   set up, then train the tiny BitNet on an embedded corpus (a few minutes on a CPU)
#   make test   set up, then run the test suite
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# torch is installed first and only if missing: we never replace the build you chose (CUDA or CPU).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup setup-test demo test test-fast bench

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[all]"

setup-test:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev]"
	@$(PYTHON) -c "import llama_cpp" 2>/dev/null || $(PIP) install "llama-cpp-python>=0.3.10"
	@$(PYTHON) -c "import ik_llama_cpp" 2>/dev/null || $(PIP) install "ik-llama-cpp-python>=0.1.5" || echo "no ik-llama-cpp-python wheel for this platform: its tests skip"

demo: setup
	bash scripts/demo.sh

test: setup-test
	WANDB_MODE=offline pytest -q -rs -p no:cacheprovider tests

test-fast:
	WANDB_MODE=offline pytest -q -m "not slow" tests
