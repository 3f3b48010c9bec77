"""Atomic writes: a reader (or a crash) never sees a half-written checkpoint or export.

Everything is written under a temporary name next to the target, flushed to disk, then put in
place. A file replaces its target with one rename. A directory replaces an existing one with one
atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``); where the system or filesystem has none,
the previous directory is first renamed to ``.NAME.prev-*`` and the new one renamed into place,
and a crash between the two leaves the previous copy under that name, which :func:`recover`
(called by :func:`clean_stale`, by the next :func:`atomic_dir` of the same target, and on resume)
renames back. A process killed mid-write leaves the previous target intact (or restorable),
plus at most a ``.tmp-*`` leftover that :func:`clean_stale` removes.

Failures of the filesystem itself get an error a user can act on (:func:`write_failure`): a full
disk (``ENOSPC``, a quota, or torch's ``unexpected pos`` when its writer runs out of room) is a
:class:`~bitnet_train.errors.DiskFullError` naming the path, the bytes written and free; a read-only
filesystem or a denied directory a :class:`~bitnet_train.errors.UserError`. Where the size is known
beforehand, :func:`need_space` refuses before anything is written.

Ownership: :func:`owned` makes one process the only writer of an output directory (or of one export
path) while it runs, through an ``flock`` that the system releases when the process ends, however
it ends, so a crash never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

from bitnet_train.errors import DiskFullError, UserError

TMP_MARK = ".tmp-"
PREV_MARK = ".prev-"  # a replaced directory kept until the new one is in place (no-exchange path)


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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # not supported here (kernel, filesystem): the two-rename path recovers instead
    raise OSError(err, os.strerror(err), str(b))


def _prev_copies(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}{PREV_MARK}*"))


def recover(target: str | os.PathLike) -> Path | None:
    """Undo a directory overwrite that a crash interrupted: when ``target`` is missing and its
    previous copy (``.NAME.prev-*``) is there, rename it back; when ``target`` is there, remove
    stale previous copies. Returns the restored path, or None."""
    target = Path(target)
    prev = _prev_copies(target)
    restored = None
    if prev and not target.exists():
        os.replace(prev.pop(), target)
        _fsync_dir(target.parent)
        restored = target
    for p in prev:
        shutil.rmtree(p, ignore_errors=True)
    return restored


# torch's zip writer reports a full disk as a RuntimeError with one of these (no errno)
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def nbytes(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a directory (0 when missing)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free to this user on the filesystem that holds ``path`` (its nearest existing ancestor)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def size_text(n: int) -> str:
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:,.1f} {unit}"
    return f"{n} bytes"


def need_space(target: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse, before writing, ``what`` (about ``needed`` bytes) at ``target`` when its filesystem has
    less room than that (plus 1% and 16 MiB for metadata)."""
    free = free_bytes(Path(target).parent)
    if needed + needed // 100 + 16 * 2**20 > free:
        raise DiskFullError(f"{what} needs about {size_text(needed)} at {target}, and its filesystem has "
                            f"{size_text(free)} free; nothing was written. Free space on it, or write elsewhere")


def write_failure(exc: BaseException, target: str | os.PathLike, written: int) -> UserError | None:
    """The error a user can act on for a write of ``target`` that failed because of the filesystem (full,
    read-only, denied), or None for any other failure (re-raised as it is)."""
    if not isinstance(exc, Exception):
        return None
    eno = getattr(exc, "errno", None)
    free = free_bytes(Path(target).parent)
    torch_full = isinstance(exc, RuntimeError) and any(m in str(exc) for m in _TORCH_WRITE_FAILURES)
    if eno in (errno.ENOSPC, errno.EDQUOT) or (torch_full and free < max(written, 1) + 16 * 2**20):
        return DiskFullError(f"no space left on the filesystem of {target}: it ran out after {size_text(written)} "
                             f"were written ({size_text(free)} free now); nothing partial is left there. Free space "
                             "on it, or write elsewhere")
    if eno == errno.EROFS:
        return UserError(f"{target}: the filesystem is read-only; nothing was written")
    if eno in (errno.EACCES, errno.EPERM):
        return UserError(f"{target}: permission denied ({getattr(exc, 'filename', None) or target}); nothing was "
                         "written")
    return None


def _mkdir(d: Path, target: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (write_failure(e, target, 0) or e) from None


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike):
    """``with atomic_dir(dst) as tmp:`` write into ``tmp``; on success it becomes ``dst``.

    An existing ``dst`` is replaced only after the new one is complete, in one atomic exchange
    (or, without one, restorably: see the module docstring); on an exception the temporary
    directory is removed and ``dst`` is untouched.
    """
    target = Path(target)
    _mkdir(target.parent, target)
    recover(target)  # an earlier overwrite of this target that a crash interrupted
    tmp = target.parent / f".{target.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    _mkdir(tmp, target)
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists() and _exchange(tmp, target):
            _fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous copy; clean_stale if killed here
            return
        prev = None
        if target.exists():
            prev = target.parent / f".{target.name}{PREV_MARK}{uuid.uuid4().hex[:8]}"
            os.replace(target, prev)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if prev is not None:
            shutil.rmtree(prev, ignore_errors=True)
    except BaseException as e:
        err = write_failure(e, target, nbytes(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
        if err is not None:
            raise err from e
        raise


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """``with atomic_path(dst) as tmp:`` write the file ``tmp``; on success it becomes ``dst``."""
    t = Path(target)
    _mkdir(t.parent, t)
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
    except BaseException as e:
        err = write_failure(e, t, nbytes(tmp))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if err is not None:
            raise err from e
        raise


def clean_stale(directory: str | os.PathLike) -> list[Path]:
    """Tidy ``directory`` after a killed writer: previous copies of an interrupted overwrite are
    restored (see :func:`recover`), temporaries removed. Returns what was removed or restored."""
    d = Path(directory)
    done = []
    if not d.is_dir():
        return done
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") and PREV_MARK in p.name and p.exists():
            target = d / p.name[1:].split(PREV_MARK)[0]
            done.append(recover(target) or p)
    for p in d.iterdir():
        if p.name.startswith(".") and TMP_MARK in p.name:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            done.append(p)
    return done


def clean_leftovers(target: str | os.PathLike) -> list[Path]:
    """Tidy what a killed writer of this same ``target`` (a file or a directory written with
    :func:`atomic_path` / :func:`atomic_dir`) left: a previous copy of an interrupted overwrite is
    restored, its temporaries removed. Other targets' temporaries in the same directory (a running
    trainer's, another export's) are not touched. Call it holding ``target``'s lock (:func:`owned`)."""
    t = Path(target)
    done = []
    if not t.parent.is_dir():
        return done
    restored = recover(t)
    if restored is not None:
        done.append(restored)
    for p in t.parent.glob(f".{t.name}{TMP_MARK}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(p)
    return done


LOCK_NAME = ".bitnet-train.lock"  # inside an output directory; an export path's is ``.NAME.lock`` beside it


@contextlib.contextmanager
def owned(target: str | os.PathLike, what: str, inside: bool = True):
    """``with owned(output_dir, "pretrain"):`` this process is the only writer of ``target`` until
    the block ends: an exclusive ``flock`` on ``target/.bitnet-train.lock`` (``inside``) or on
    ``.NAME.lock`` beside the file ``target``, taken before anything else is written there. A second
    owner gets a :class:`UserError` naming ``target`` and the holder (PID, host, start time, command).

    Under several launched processes only rank 0 (``RANK`` unset or 0) takes it. The lock file is
    removed on release; one that a killed process left holds no lock (the system released it with the
    process) and is simply taken over. An output directory made here and left empty is removed again."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return
    t = Path(target)
    created = inside and not t.exists()
    if inside:
        _mkdir(t, t)
        path = t / LOCK_NAME
    else:
        _mkdir(t.parent, t)
        path = t.parent / f".{t.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise (write_failure(e, t, 0) or e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{t} is in use: {_holder(path)} is writing it ({what} was refused, nothing written); "
                            "wait for that process to end, or choose another "
                            + ("output_dir" if inside else "--out")) from None
        try:  # the file we locked is still the one at ``path`` (its last holder did not remove it meanwhile)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # before the release: a waiting process then locks a fresh file
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                t.rmdir()  # made for the lock alone (a run refused on bad input) and still empty: gone again


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return (f"{h.get('what', 'a process')} (PID {h.get('pid')} on {h.get('host')}, started {h.get('started')}: "
                f"{h.get('command')})")
    except (OSError, ValueError):
        return "another process"
