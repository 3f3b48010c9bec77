"""Atomic writes: an overwrite killed at any point leaves the previous copy or the new one, never
neither (bitnet_train/fsutil.py). The kills are real: a subprocess SIGKILLs itself at the step."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bitnet_train import fsutil

REPO = Path(__file__).resolve().parents[1]

# Overwrite DIR/final (holding "old") with a new copy ("new"), killing the process with SIGKILL
# at the point named by argv[2]:
#   between   after the previous copy is moved aside, before the new one is renamed in
#             (the path taken where no atomic exchange exists: forced with _exchange -> False)
#   after     after the atomic exchange, before the previous copy (now the temporary) is removed
KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from bitnet_train import fsutil

    target, where = Path(sys.argv[1]), sys.argv[2]
    real_replace, real_rmtree = os.replace, fsutil.shutil.rmtree
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "between":
        fsutil._exchange = lambda a, b: False
        calls = []
        def replace(src, dst):
            real_replace(src, dst)
            calls.append(dst)
            if Path(src) == target:  # the previous copy has just been moved aside
                die()
        fsutil.os.replace = replace
    else:
        fsutil.shutil.rmtree = die
    with fsutil.atomic_dir(target) as tmp:
        (tmp / "data.txt").write_text("new")
    print("not killed", flush=True)
""")


def _kill_during_overwrite(tmp_path: Path, where: str) -> Path:
    target = tmp_path / "final"
    target.mkdir()
    (target / "data.txt").write_text("old")
    r = subprocess.run([sys.executable, "-c", KILLER, str(target), where], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == -9, (r.returncode, r.stdout, r.stderr)
    return target


def test_kill_between_the_two_renames_restores_the_previous_copy(tmp_path):
    target = _kill_during_overwrite(tmp_path, "between")
    assert not target.exists()  # the window this guards: only the previous copy, under its PREV name
    (prev,) = [p for p in tmp_path.iterdir() if fsutil.PREV_MARK in p.name]
    assert (prev / "data.txt").read_text() == "old"
    done = fsutil.clean_stale(tmp_path)
    assert target in done
    assert (target / "data.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # the new, unfinished temp is gone too


def test_next_overwrite_recovers_first(tmp_path):
    target = _kill_during_overwrite(tmp_path, "between")
    with fsutil.atomic_dir(target) as tmp:
        assert (target / "data.txt").read_text() == "old"  # restored before the new write starts
        (tmp / "data.txt").write_text("newer")
    assert (target / "data.txt").read_text() == "newer"
    assert not [p for p in tmp_path.iterdir() if fsutil.PREV_MARK in p.name]


def test_kill_after_the_exchange_keeps_the_new_copy(tmp_path):
    # with the exchange (Linux) the kill lands after the one atomic step; without it, after the
    # second rename: either way the new copy is in place and the old one is a leftover
    target = _kill_during_overwrite(tmp_path, "after")
    assert (target / "data.txt").read_text() == "new"
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and (leftovers[0] / "data.txt").read_text() == "old"
    fsutil.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert (target / "data.txt").read_text() == "new"


def test_exchange_is_used_on_linux(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    swapped = fsutil._exchange(a, b)
    assert swapped == sys.platform.startswith("linux")  # elsewhere: the restorable two-rename path
    assert (a / "x").read_text() == ("b" if swapped else "a")


def test_failed_write_keeps_target_and_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "data.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with fsutil.atomic_dir(target) as tmp:
            (tmp / "data.txt").write_text("half")
            raise RuntimeError("boom")
    assert (target / "data.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(RuntimeError):
        with fsutil.atomic_path(tmp_path / "f.bin") as tmp:
            tmp.write_bytes(b"x")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert os.listdir(target) == ["data.txt"]


# --- one owner per output directory / export path -------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from bitnet_train.fsutil import owned
    with owned(sys.argv[1], "pretrain", inside=sys.argv[2] == "inside"):
        print("held", flush=True)
        time.sleep(600)
""")


def _hold(target: Path, inside: bool = True) -> subprocess.Popen:
    """A real second process that owns ``target`` until it is killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), "inside" if inside else "beside"],
                         stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_run_into_a_running_output_dir_is_refused(tmp_path, capsys):
    from bitnet_train.cli import main

    out = tmp_path / "run"
    holder = _hold(out)
    try:
        rc = main(["pretrain", str(REPO / "recipes" / "tiny.yaml"), "--no-progress", "--set", f"output_dir={out}"])
        err = capsys.readouterr().err
        assert rc == 2 and str(out) in err and f"PID {holder.pid}" in err and "in use" in err, err
        assert sorted(p.name for p in out.iterdir()) == [fsutil.LOCK_NAME]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # killed (SIGKILL): the system released its lock; the file it left is taken over and removed after
    assert (out / fsutil.LOCK_NAME).exists()
    with fsutil.owned(out, "pretrain"):
        with pytest.raises(fsutil.UserError, match=f"PID {os.getpid()}"):
            with fsutil.owned(out, "sft"):  # the same process, another owner: refused too
                pass
    assert not (out / fsutil.LOCK_NAME).exists()


def test_second_export_to_the_same_out_is_refused(tmp_path, capsys):
    from bitnet_train.cli import main

    ck = tmp_path / "ck"
    assert main(["init", "tiny", "--out", str(ck)]) == 0
    out = tmp_path / "m.gguf"
    holder = _hold(out, inside=False)
    try:
        rc = main(["export", str(ck), "--format", "hf", "--out", str(out), "--no-verify", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and str(out) in err and f"PID {holder.pid}" in err, err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_ranks_other_than_zero_take_no_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with fsutil.owned(tmp_path, "pretrain"):
        assert not (tmp_path / fsutil.LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------
# a full or read-only filesystem: a clear error, nothing partial, the previous copy intact
# ---------------------------------------------------------------------------------------------

TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 27860416 vs 27860308"


def test_full_disk_while_writing_leaves_nothing_partial(tmp_path, monkeypatch):
    import errno

    from bitnet_train.errors import DiskFullError

    f = tmp_path / "m.gguf"
    f.write_text("old")
    with pytest.raises(DiskFullError, match=rf"no space left on the filesystem of {f}: it ran out after 5 bytes"):
        with fsutil.atomic_path(f) as tmp:
            tmp.write_text("12345")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]

    # torch's zip writer says it without an errno: a full disk when the filesystem has no room left
    d = tmp_path / "final"
    d.mkdir()
    (d / "w").write_text("old")
    monkeypatch.setattr(fsutil, "free_bytes", lambda path: 4096)
    with pytest.raises(DiskFullError, match=r"ran out after 3 bytes were written \(4.0 KiB free now\)"):
        with fsutil.atomic_dir(d) as tmp:
            (tmp / "w").write_text("new")
            raise RuntimeError(TORCH_FULL)
    assert (d / "w").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["final", "m.gguf"]
    # the same RuntimeError with room to spare is not a full disk: it is raised as it is
    monkeypatch.setattr(fsutil, "free_bytes", lambda path: 2**40)
    with pytest.raises(RuntimeError, match="unexpected pos"):
        with fsutil.atomic_dir(d):
            raise RuntimeError(TORCH_FULL)


def test_read_only_filesystem_and_space_check(tmp_path, monkeypatch):
    import errno

    from bitnet_train.errors import DiskFullError, UserError

    out = tmp_path / "ro" / "run"
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if "ro" in self.parts:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    for enter in (lambda: fsutil.atomic_dir(out / "final"), lambda: fsutil.owned(out, "pretrain")):
        with pytest.raises(UserError, match="the filesystem is read-only; nothing was written"):
            with enter():
                pass
    monkeypatch.undo()
    free = fsutil.free_bytes(tmp_path)
    with pytest.raises(DiskFullError, match=rf"checkpoint step-000020 needs about .* at {tmp_path / 'x'}, and its "
                                            r"filesystem has .* free; nothing was written"):
        fsutil.need_space(tmp_path / "x", free, "checkpoint step-000020")
    fsutil.need_space(tmp_path / "x", 1024, "a small file")  # room: no error


def test_pretrain_on_a_full_disk_stops_with_its_last_checkpoint_and_resumes(tmp_path, monkeypatch, capsys):
    """The disk fills after the step-2 checkpoint: the step-4 save is refused before anything is written,
    the error names the intact step-2 checkpoint and exits 2 from the CLI; with room again, --resume ends
    the run as a run that never failed does (the same losses)."""
    from test_pretrain import _shakespeare, read_metrics, write_recipe

    from bitnet_train.cli import main

    recipe = write_recipe(tmp_path, _shakespeare(), max_steps=6, save_every=2, eval_every=6, keep_last=3)
    out = tmp_path / "run"
    real_free = fsutil.free_bytes

    def filling(path):  # room until step 2 is saved
        return 10 * 2**20 if (out / "checkpoints" / "step-000002").exists() else real_free(path)

    monkeypatch.setattr(fsutil, "free_bytes", filling)
    assert main(["pretrain", str(recipe), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint step-000004 needs about" in err and "nothing was written" in err, err
    assert f"The last complete checkpoint, {out / 'checkpoints' / 'step-000002'}, is intact: --resume" in err, err
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert not list((out / "checkpoints").glob(".*")) and not (out / ".bitnet-train.lock").exists()
    assert main(["pretrain", str(recipe), "--resume", "--no-progress"]) == 0
    resumed = [r["loss"] for r in read_metrics(out) if "loss" in r and r["step"] > 2]

    ref = tmp_path / "ref"
    ref.mkdir()
    assert main(["pretrain", str(write_recipe(ref, _shakespeare(), max_steps=6, save_every=2, eval_every=6,
                                               keep_last=3)), "--no-progress"]) == 0
    assert resumed[-4:] == [r["loss"] for r in read_metrics(ref / "run") if "loss" in r and r["step"] > 2]


def test_saving_names_the_intact_checkpoint_for_filesystem_failures_only(tmp_path):
    """checkpointer.saving: a failed write (here an in-place writer's ENOSPC) gets the checkpoint that is
    still intact and its partial directory removed; any other error of a save passes through unchanged."""
    import errno

    from bitnet_train.checkpoint.checkpointer import saving
    from bitnet_train.errors import CheckpointError, DiskFullError

    ck = tmp_path / "checkpoints" / "step-000004"
    with pytest.raises(CheckpointError) as e:
        with saving(ck, tmp_path, 0):
            raise CheckpointError("some BitLinear layers have an input RMSNorm and some do not")
    assert "intact" not in str(e.value) and "checkpoint" not in str(e.value).split("RMSNorm")[1]
    with pytest.raises(DiskFullError, match=r"no space left .* No checkpoint of this run was completed; a lower "
                                            r"train.keep_last"):
        with saving(ck, tmp_path, 0, in_place=True):
            ck.mkdir(parents=True)
            (ck / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not ck.exists()
