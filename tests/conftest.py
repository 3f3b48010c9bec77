import os

# Triton kernels run in Triton's CPU interpreter in the test suite. This must be set before
# anything (transformers included) imports triton, so it lives here rather than in a test module.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# real English shipped in the repository (tests/data/README.md says where it is from)
SHAKESPEARE = REPO / "tests" / "data" / "tinyshakespeare.txt"


@pytest.fixture
def shakespeare_path() -> Path:
    return SHAKESPEARE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# A test may skip only for hardware or a runtime build that a clone cannot install by itself: a CUDA
# GPU, a bitnet.cpp build (BITNET_CPP_DIR), or a platform with no ik-llama-cpp-python wheel. Any other
# skip (a missing package that `make test` installs, a missing data file) fails the test, so a green
# run means every other test ran. Reasons are printed with `-rs` (the Makefile passes it).
ALLOWED_SKIPS = ("needs a CUDA GPU", "no bitnet.cpp build", "Triton's NVIDIA backend is not available",
                 "no ik-llama-cpp-python wheel")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.skipped or hasattr(rep, "wasxfail"):
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    if not reason.removeprefix("Skipped: ").startswith(ALLOWED_SKIPS):
        rep.outcome = "failed"
        rep.longrepr = (f"{item.nodeid} was skipped ({reason!r}); the suite allows skips only for "
                        f"{', '.join(ALLOWED_SKIPS)} (tests/conftest.py ALLOWED_SKIPS)")
