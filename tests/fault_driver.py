"""Run one ``bitnet-train`` command with a fault injected for real (tests/test_faults.py).

    python tests/fault_driver.py FAULT TARGET[:GLOB] N -- ARGS...

The fault strikes when this process opens, for writing, the ``N``-th file inside the temporary of the
path named ``TARGET`` (``step-000004``, ``final``, an export's or a token directory's name) whose name
matches ``GLOB`` (default any) — so the temporary holds some of the files and not others:

* ``kill``: the process SIGKILLs itself (a crash, an OOM kill, a preempted node);
* ``full``: the open fails with ENOSPC, as on a full filesystem, through the real writer's error path;
* ``hold``: the process waits there, holding what it holds (its lock), until it is killed: a run that
  is still running when a second one starts.

The file's path is written to ``$FAULT_MARKER`` first when that is set. The hook is a Python audit hook
on ``open``, so it sees the files Python code opens (JSON, tokenizer files, token shards, GGUF); the
writers of safetensors and ``torch.save`` open theirs in native code, between those.
"""

import errno
import fnmatch
import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    fault, where, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    assert sys.argv[4] == "--" and fault in ("kill", "full", "hold"), sys.argv
    args = sys.argv[5:]
    target, _, pattern = where.partition(":")
    prefix = f".{target}.tmp-"
    marker = os.environ.get("FAULT_MARKER")
    seen: list[str] = []

    def hook(event, a):
        if event != "open" or not a or isinstance(a[0], int) or a[0] is None:
            return
        path, mode, flags = a
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
        p = Path(os.fsdecode(path))
        inside = any(part.startswith(prefix) for part in p.parts)
        if not (writing and inside and (not pattern or fnmatch.fnmatch(p.name, pattern))):
            return
        seen.append(str(p))
        if len(seen) != nth:
            return
        if marker:
            Path(marker).write_text(str(p))
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault == "full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(p))
        else:
            time.sleep(600)

    sys.addaudithook(hook)
    from bitnet_train.cli import main as cli

    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
