"""scripts/bench_train_step.py (the side-by-side training-step benchmark of the GPU run) on the CPU:
every implementation gets a row, the ratios are taken against nn.Linear of the same process, the
BitLinear rows compute BitLinear, and a peer that is absent, CUDA-only or broken gets a status
instead of a number."""

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from scriptload import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_train_step.py"


def test_cpu_run_times_every_implementation_against_nn_linear(tmp_path):
    out = tmp_path / "rows.json"
    # TRITON_INTERPRET=1 comes from tests/conftest.py: the triton rows run in Triton's interpreter
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--shapes", "64x128", "--tokens", "1,20",
                        "--reps", "1", "--warmup-reps", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    mod = load_script("bench_train_step")
    rows = res["rows"]
    assert [(x["M"], x["impl"]) for x in rows] == [(m, name) for m in (1, 20) for name in mod.IMPLS]
    have_torchao = importlib.util.find_spec("torchao") is not None
    have_onebit = importlib.util.find_spec("onebitllms") is not None
    for m in (1, 20):
        by = {x["impl"]: x for x in rows if x["M"] == m}
        lin = by["nn.Linear"]
        assert lin["vs_linear"] == 1.0 and lin["rel_err"] is None
        measured = ["torch", "triton", "triton-cached", "int_mm"] + (["torchao"] if have_torchao else [])
        for name in measured:
            x = by[name]
            assert "status" not in x, x
            assert x["ms"] > 0 and x["vs_linear"] == pytest.approx(x["ms"] / lin["ms"])
            assert x["tflops"] == pytest.approx(6 * m * 64 * 128 / (x["ms"] * 1e-3) / 1e12)
            # the forward is BitLinear's: bf16 rounding of the exact product, far below a wrong quantizer's error
            assert x["rel_err"] < 1e-2, x
        assert by["torchao"].get("status") == (None if have_torchao else "not installed")
        assert by["onebitllms"]["status"] == ("needs CUDA" if have_onebit else "not installed")
    # the summary table has a line per (mode, shape, M) with every implementation's ratio or status
    tail = r.stdout.split("summary:")[1].splitlines()
    assert tail[1].split()[:3] == ["mode", "out", "x"] and len(tail) == 4, tail
    assert "needs CUDA" in tail[2] or "not inst." in tail[2]


def test_absent_cuda_only_and_broken_peers_get_a_status(monkeypatch):
    import torch
    from transformers import PreTrainedModel  # noqa: F401 - imported before the stand-ins below (transformers probes torchao)

    import bitnet_train.layers.bitlinear  # noqa: F401

    mod = load_script("bench_train_step")
    # onebitllms importable (a stand-in): on the CPU it is CUDA-only
    fake = types.ModuleType("onebitllms")
    fake.BitNetLinear = torch.nn.Linear
    monkeypatch.setitem(sys.modules, "onebitllms", fake)
    # torchao present but broken: an import inside it fails
    broken = types.ModuleType("torchao")

    def _getattr(name):
        raise ModuleNotFoundError("No module named 'torchao_dep'", name="torchao_dep")

    broken.__getattr__ = _getattr
    broken.__path__ = []  # a package whose submodules cannot be found
    monkeypatch.setitem(sys.modules, "torchao", broken)
    impls = mod.implementations(torch.device("cpu"), interpret=False)
    assert impls["onebitllms"] == (None, "needs CUDA")
    assert impls["torchao"][0] is None and impls["torchao"][1].startswith("error: import:")
    assert impls["triton"] == (None, "needs CUDA (or TRITON_INTERPRET=1)")

    # a factory that fails, and one whose step fails: a status row each, the other rows measured
    def bad_build(lin):
        raise RuntimeError("no such kernel")

    class BadStep(torch.nn.Module):
        def forward(self, x):
            raise ValueError("shape mismatch\nsecond line")

    impls = {name: (None, "not installed") for name in mod.IMPLS}
    impls["nn.Linear"] = (lambda lin: lin, None)
    impls["torch"] = (bad_build, None)
    impls["int_mm"] = (lambda lin: BadStep(), None)
    args = types.SimpleNamespace(reps=1, warmup_reps=0)
    rows, seen = [], []
    mod.run_mode("bf16", [(8, 16)], [3], torch.device("cpu"), args, impls, seen.append, rows)
    assert rows == seen and [r["impl"] for r in rows] == list(mod.IMPLS)
    by = {r["impl"]: r for r in rows}
    assert by["nn.Linear"]["ms"] > 0
    assert by["torch"]["status"].startswith("error: build: RuntimeError: no such kernel (at tests/test_bench_train_step.py:")
    assert by["int_mm"]["status"].startswith("error: ValueError: shape mismatch (at tests/test_bench_train_step.py:")
    assert by["torchao"]["status"] == "not installed"
