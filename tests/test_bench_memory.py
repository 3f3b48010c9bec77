"""scripts/bench_memory.py runs (tiny, one step) and reports what it measured; --malloc names what is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from scriptload import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_memory.py"


def test_tiny_step_figures(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--presets", "tiny", "--quants", "bitnet,none", "--steps", "1",
                        "--batch", "2", "--seq", "64", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["quant"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"bitnet", "none"}
    for row in rows.values():
        assert row["malloc"] == "glibc" and row["optim_state"] == "eager"
        assert row["peak_mib"] > row["rss_built_mib"] > 0 and row["tokens_per_s"] > 0
        assert row["alloc_mib"] > 0 and row["saved_mib"] > 0
    # exact, not sampled: autograd keeps int8 codes where nn.Linear keeps its fp32 input
    assert rows["bitnet"]["saved_mib"] < 0.95 * rows["none"]["saved_mib"]
    assert "bitnet" in r.stdout and "/ none" in r.stdout


def test_allocator_lookup_and_missing_library(monkeypatch):
    mod = load_script("bench_memory")
    assert mod._loaded_malloc() in mod.MALLOCS
    for name in ("jemalloc", "tcmalloc"):
        path = mod._find_malloc(name)
        assert path is None or Path(path).exists()
    # with no such library anywhere, the script stops with a message naming what to install
    monkeypatch.setattr(mod, "_find_malloc", lambda name: None)
    monkeypatch.setattr(sys, "argv", ["bench_memory.py", "--malloc", "jemalloc", "--presets", "tiny"])
    try:
        mod.main()
    except SystemExit as e:
        msg = str(e.code)
    else:
        raise AssertionError("--malloc jemalloc with no library found did not stop")
    assert "--malloc jemalloc" in msg and "libjemalloc" in msg and "apt install libjemalloc2" in msg
