"""scripts/gpu_check.sh run's plumbing on the CPU (its dry run, two of its steps): the package is
assembled from this checkout and is what the steps import, each step's exit code lands in
summary.txt, a failing step does not stop the next, and $OUT holds only summary.txt and
results.tar.gz (the device tool returns at most 8 files) with every log inside."""

import os
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_of_two_steps_writes_the_summary_and_the_tarball(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    env = {**os.environ, "GPU_RUN_DRY": "1", "GPU_RUN_WORK": str(work), "OUT": str(out),
           "GPU_RUN_STEPS": "selfcheck gpu-tests"}
    env.pop("GPU_RUN_LOCK", None)
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "run"], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert r.stdout.endswith(summary)  # printed last: the device call's reply ends with it
    lines = summary.splitlines()
    assert lines[0].startswith("gpu_check.sh run (dry run on the CPU)")
    # the steps import the package assembled from this checkout, not another copy
    assert any(ln.startswith("bitnet_train ") and ln.endswith(str(work / "pkg" / "bitnet_train" / "__init__.py"))
               for ln in lines), summary
    steps = [ln for ln in lines if ln.startswith("step ")]
    # selfcheck needs CUDA (exit 2); the GPU tests all skip on the CPU (exit 0): both ran, in order
    assert [s.split(":")[0] for s in steps if not s.startswith("step wheels")] == ["step gpu-tests", "step selfcheck"]
    assert any(s.startswith("step gpu-tests: exit 0 in ") for s in steps), steps
    assert any(s.startswith("step selfcheck: exit 2 in ") for s in steps), steps
    assert "skipped" in summary.split("---- gpu-tests")[1]  # the excerpt: pytest's last line
    with tarfile.open(out / "results.tar.gz") as t:
        names = set(t.getnames())
        assert {"logs/env.txt", "logs/gpu-tests.txt", "logs/selfcheck.txt"} <= names, names
        assert "selfcheck: no CUDA device" in t.extractfile("logs/selfcheck.txt").read().decode()
