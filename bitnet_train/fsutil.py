"""Atomic writes: a reader (or a crash) never sees a half-written checkpoint or export.

Everything is written under a temporary name next to the target, flushed to disk, then renamed
into place. A process killed mid-write leaves the previous target intact, plus at most a
``.tmp-*`` leftover that :func:`clean_stale` removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

TMP_MARK = ".tmp-"


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike):
    """``with atomic_dir(dst) as tmp:`` write into ``tmp``; on success it becomes ``dst``.

    An existing ``dst`` is replaced only after the new one is complete; on an exception the
    temporary directory is removed and ``dst`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old{TMP_MARK}{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """``with atomic_path(dst) as tmp:`` write the file ``tmp``; on success it becomes ``dst``."""
    t = Path(target)
    t.parent.mkdir(parents=True, exist_ok=True)
    tmp = t.parent / f".{t.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, t)
        _fsync_dir(t.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def clean_stale(directory: str | os.PathLike) -> list[Path]:
    """Remove temporaries left by a killed writer in ``directory``; returns what was removed."""
    d = Path(directory)
    removed = []
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        if p.name.startswith(".") and TMP_MARK in p.name:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    return removed
