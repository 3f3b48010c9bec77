# The two commands a new user runs on a fresh machine:
#   make demo   set up, then train the tiny BitNet on an embedded corpus (a few minutes on a CPU)
#   make test   set up, then run the test suite
# and, for a maintainer who suspects a new release broke something (each in a brand-new venv):
#   make check-latest   the newest versions pyproject.toml allows, fast tests
#   make check-floors   every dependency at its lower bound (.ci/floors.txt), fast tests
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# torch is installed first and only if missing: we never replace the build you chose (CUDA or CPU).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup setup-test demo test test-fast check-latest check-floors

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[all]"

setup-test:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev,llama]"

demo: setup
	bash scripts/demo.sh

test: setup-test
	WANDB_MODE=offline pytest -q -rs -p no:cacheprovider tests

test-fast:
	WANDB_MODE=offline pytest -q -rs -p no:cacheprovider -m "not slow" tests

check-latest:
	bash scripts/fresh_env.sh latest setup-test test-fast

check-floors:
	bash scripts/fresh_env.sh floors setup-test test-fast
