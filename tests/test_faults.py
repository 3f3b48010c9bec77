"""The fault matrix: each fault injected for real into a real ``bitnet-train`` process, what is on disk
afterwards, and that ``--resume`` (or running the command again) continues from the last complete state.

Faults (``tests/fault_driver.py``): ``kill`` (the process SIGKILLs itself), ``full`` (a write fails with
ENOSPC, through the writer's own error path), a second process while the first is still writing. Phases:
a checkpoint save, the save of ``final/``, an export, ``tokenize``. Each case also checks its row of the
table in docs/faults.md (built here from what the case saw), so the table says what the tests see.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitnet_train import fsutil
from bitnet_train.cli import main

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "fault_driver.py"
DOC = REPO / "docs" / "faults.md"
LOCK = fsutil.LOCK_NAME

# phase -> (the path the fault strikes in, the file pattern there, which of those opens, what is written)
PHASES = {
    "checkpoint": ("step-000004", "", 2, "the checkpoint of step 4"),
    "final": ("final", "", 2, "`final/` (after the step-6 checkpoint)"),
    "export": ("exp", "", 2, "`export --format hf`"),
    "tokenize": ("tok", "shard-*.bin", 2, "`tokenize` (the second shard)"),
}
FAULT_WORDS = {"kill": "SIGKILL", "full": "disk full (ENOSPC)", "second": "a second process"}


def _masked(p: Path, root: Path) -> str:
    rel = p.relative_to(root).as_posix() + ("/" if p.is_dir() else "")
    return re.sub(r"tmp-[0-9a-f]{8}", "tmp-*", rel)


def listing(root: Path, what: tuple[str, ...]) -> str:
    """The entries of ``root`` (and of its ``checkpoints/``) that say what a fault left, with the
    random suffix of a temporary masked."""
    seen = []
    for d in (root, root / "checkpoints"):
        if d.is_dir():
            seen += [_masked(p, root) for p in d.iterdir() if p.name in what or p.name.startswith(".")
                     or p.name.startswith("step-")]
    return ", ".join(f"`{s}`" for s in sorted(seen)) or "nothing"


def row(fault: str, phase: str, exit_text: str, left: str, then: str) -> str:
    return f"| {FAULT_WORDS[fault]} | {PHASES[phase][3]} | {exit_text} | {left} | {then} |"


def check_row(line: str) -> None:
    assert line in DOC.read_text().splitlines(), f"docs/faults.md lacks the row the test saw:\n{line}"


def drive(fault: str, phase: str, args: list[str], marker: Path | None = None, wait: bool = True):
    target, pattern, nth, _ = PHASES[phase]
    where = f"{target}:{pattern}" if pattern else target
    env = None
    if marker is not None:
        import os

        env = {**os.environ, "FAULT_MARKER": str(marker)}
    cmd = [sys.executable, str(DRIVER), fault, where, str(nth), "--", *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def exit_text(r) -> str:
    return "killed" if r.returncode == -signal.SIGKILL else f"exit {r.returncode}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small pretraining recipe (6 steps, a checkpoint every 2, keep_last 3) and what an uninterrupted
    run of it gives: its losses, its final/ (the export's source), an export and a token directory."""
    from test_pretrain import _shakespeare, read_metrics, write_recipe

    root = tmp_path_factory.mktemp("faults")
    text = root / "text.txt"
    text.write_text(_shakespeare().read_text()[:60000])
    recipe = write_recipe(root, text, max_steps=6, save_every=2, eval_every=0, keep_last=3)
    ref = root / "ref"
    assert main(["pretrain", str(recipe), "--set", f"output_dir={ref}", "--no-progress"]) == 0
    losses = [(m["step"], m["loss"]) for m in read_metrics(ref) if "loss" in m]
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert main(["export", str(ref / "final"), "--format", "hf", "--out", str(root / "ref-exp"), "--no-progress"]) == 0
    assert main(tokenize_args(text, root / "ref-tok")) == 0
    return {"root": root, "text": text, "recipe": recipe, "losses": losses, "ckpt": ref / "final"}


def tokenize_args(text: Path, out: Path) -> list[str]:
    return ["tokenize", str(text), "--tokenizer", "bpe:300", "--out", str(out), "--shard-tokens", "4000", "--no-progress"]


def same_files(a: Path, b: Path, skip: tuple[str, ...] = ()) -> bool:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name not in skip)
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name not in skip)
    return fa == fb and all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)


def pretrain_args(world, out: Path, *extra: str) -> list[str]:
    return ["pretrain", str(world["recipe"]), "--set", f"output_dir={out}", "--no-progress", *extra]


def resume_and_check(world, out: Path) -> str:
    """``--resume`` ends the run as an uninterrupted one does: the same losses for every step, each
    step once in metrics.jsonl, checkpoints 2/4/6 and final/, nothing temporary, no lock."""
    from test_pretrain import read_metrics

    assert main(pretrain_args(world, out, "--resume")) == 0
    losses = [(m["step"], m["loss"]) for m in read_metrics(out) if "loss" in m]
    assert losses == world["losses"]
    assert listing(out, ("final",)) == "`checkpoints/step-000002/`, `checkpoints/step-000004/`, " \
                                       "`checkpoints/step-000006/`, `final/`"
    return "`pretrain --resume`: steps 1-6 with the losses of an uninterrupted run, checkpoints 2/4/6 and `final/`"


# -------------------------------------------------------------------------------- kill / disk full


@pytest.mark.parametrize("fault", ["kill", "full"])
@pytest.mark.parametrize("phase", ["checkpoint", "final"])
def test_pretrain_save_fault(world, tmp_path, fault, phase):
    out = tmp_path / "run"
    r = drive(fault, phase, pretrain_args(world, out))
    left = listing(out, ("final", LOCK))
    done = "`checkpoints/step-000002/`" if phase == "checkpoint" else \
        "`checkpoints/step-000002/`, `checkpoints/step-000004/`, `checkpoints/step-000006/`"
    if fault == "kill":
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
        tmp = "`checkpoints/.step-000004.tmp-*/`" if phase == "checkpoint" else "`.final.tmp-*/`"
        # the killed process's lock file stays (the system released the lock itself), and its temporary
        assert left == ", ".join(sorted([f"`{LOCK}`", tmp, *done.split(", ")])), left
    else:
        target = out / "checkpoints" / "step-000004" if phase == "checkpoint" else out / "final"
        last = out / "checkpoints" / ("step-000002" if phase == "checkpoint" else "step-000006")
        assert r.returncode == 2, r.stderr[-2000:]
        assert f"no space left on the filesystem of {target}" in r.stderr, r.stderr
        assert f"The last complete checkpoint, {last}, is intact: --resume continues from it" in r.stderr
        assert left == done, left  # nothing partial, the lock released
    then = resume_and_check(world, out)
    check_row(row(fault, phase, exit_text(r), left, then + (", the temporary removed" if fault == "kill" else "")))


@pytest.mark.parametrize("fault", ["kill", "full"])
def test_export_fault(world, tmp_path, fault):
    out = tmp_path / "exp"
    r = drive(fault, "export", ["export", str(world["ckpt"]), "--format", "hf", "--out", str(out), "--no-progress"])
    left = listing(tmp_path, ("exp",))
    if fault == "kill":
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
        assert left == "`.exp.lock`, `.exp.tmp-*/`", left
    else:
        assert r.returncode == 2 and f"no space left on the filesystem of {out}" in r.stderr, r.stderr[-2000:]
        assert left == "nothing", left
    assert main(["export", str(world["ckpt"]), "--format", "hf", "--out", str(out), "--no-progress"]) == 0
    assert listing(tmp_path, ("exp",)) == "`exp/`" and same_files(out, world["root"] / "ref-exp")
    then = "the same `export` again: the export an uninterrupted one writes" + \
        (", the leftovers removed" if fault == "kill" else "")
    check_row(row(fault, "export", exit_text(r), left, then))


@pytest.mark.parametrize("fault", ["kill", "full"])
def test_tokenize_fault(world, tmp_path, fault):
    out = tmp_path / "tok"
    r = drive(fault, "tokenize", tokenize_args(world["text"], out))
    left = listing(tmp_path, ("tok",))
    if fault == "kill":
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
        assert left == "`.tok.lock`, `.tok.tmp-*/`", left
    else:
        assert r.returncode == 2 and f"no space left on the filesystem of {out}" in r.stderr, r.stderr[-2000:]
        assert left == "nothing", left
    assert main(tokenize_args(world["text"], out)) == 0
    assert listing(tmp_path, ("tok",)) == "`tok/`"
    assert same_files(out, world["root"] / "ref-tok", skip=("index.json",))  # the index holds timings
    then = "the same `tokenize` again: the shards an uninterrupted one writes" + \
        (", the leftovers removed" if fault == "kill" else "")
    check_row(row(fault, "tokenize", exit_text(r), left, then))


# -------------------------------------------------------------------------------- a second process


def _held(proc, marker: Path) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1][-3000:]


@pytest.mark.parametrize("phase", ["checkpoint", "export", "tokenize"])
def test_second_process_is_refused(world, tmp_path, phase):
    """The first process stops inside its write (holding its lock); a second one on the same path exits 2
    naming it and the holder, and writes nothing; the first is then killed and the work continues."""
    marker = tmp_path / "marker"
    if phase == "checkpoint":
        out = tmp_path / "run"
        args = pretrain_args(world, out)
    elif phase == "export":
        out = tmp_path / "exp"
        args = ["export", str(world["ckpt"]), "--format", "hf", "--out", str(out), "--no-progress"]
    else:
        out = tmp_path / "tok"
        args = tokenize_args(world["text"], out)
    first = drive("hold", phase, args, marker=marker, wait=False)
    try:
        _held(first, marker)
        before = listing(out if phase == "checkpoint" else tmp_path, ("final", LOCK, "exp", "tok", "metrics.jsonl"))
        metrics = (out / "metrics.jsonl").read_bytes() if phase == "checkpoint" else None
        second = subprocess.run([sys.executable, "-m", "bitnet_train.cli", *args], capture_output=True, text=True,
                                cwd=REPO, timeout=600)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"{out} is in use" in second.stderr and f"PID {first.pid}" in second.stderr, second.stderr
        after = listing(out if phase == "checkpoint" else tmp_path, ("final", LOCK, "exp", "tok", "metrics.jsonl"))
        assert after == before and (metrics is None or (out / "metrics.jsonl").read_bytes() == metrics)
    finally:
        first.kill()
        first.wait()
    if phase == "checkpoint":
        then = "the first killed, then " + resume_and_check(world, out)
    elif phase == "export":
        assert main(args) == 0 and same_files(out, world["root"] / "ref-exp")
        then = "the first killed, then the same `export` again: the export an uninterrupted one writes"
    else:
        assert main(args) == 0 and same_files(out, world["root"] / "ref-tok", skip=("index.json",))
        then = "the first killed, then the same `tokenize` again: the shards an uninterrupted one writes"
    check_row(row("second", phase, "exit 2 (`… is in use: … PID …`), nothing written", "the first's state, "
                  "unchanged", then))


def test_table_has_no_rows_the_tests_do_not_make():
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| ") and not line.startswith("| fault")
            and not set(line) <= set("|- ")]
    assert len(rows) == 4 + 2 + 2 + 3, rows  # the save faults, export, tokenize, the second processes


def test_driver_reports_bad_arguments():
    r = subprocess.run([sys.executable, str(DRIVER), "melt", "x", "1", "--", "--help"], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert r.returncode != 0 and "melt" in r.stderr
