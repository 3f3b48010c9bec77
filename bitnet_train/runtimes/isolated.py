"""A runtime's :meth:`~.base.Runtime.probe` in a child process, for engines that abort the process on
input they cannot take (ik_llama.cpp's ``GGML_ASSERT``): the abort becomes an :class:`~.base.EngineError`
here instead of ending the caller.

    python -m bitnet_train.runtimes.isolated JOB.json   # the child; JOB names engine, file, ids, text
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bitnet_train.runtimes.base import EngineError


def isolated_probe(engine: str, path: str | Path, ids: list[int], text: str | None = None,
                   threads: int | None = None, timeout: float = 1800) -> tuple[np.ndarray, list[int] | None]:
    """``engine``'s (a name of :data:`bitnet_train.runtimes.ENGINES`) logits for ``ids`` and tokenization of
    ``text``, from the GGUF at ``path``, computed in a child process with a context just large enough."""
    with tempfile.TemporaryDirectory() as d:
        job = Path(d) / "job.json"
        outf = Path(d) / "logits.npy"
        job.write_text(json.dumps({"engine": engine, "path": str(path), "ids": [int(i) for i in ids], "text": text,
                                   "threads": threads, "out": str(outf)}))
        r = subprocess.run([sys.executable, "-m", __name__, str(job)], capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            said = [ln for ln in r.stderr.splitlines() if "GGML_ASSERT" in ln or "error" in ln.lower()]
            raise EngineError(f"{engine} failed on {path} (exit {r.returncode}): "
                              + ("; ".join(said[:3]) or r.stderr.strip()[-1500:]))
        return np.load(outf), json.loads(r.stdout.strip().splitlines()[-1])["tokens"]


def _child(job_file: str) -> int:
    from bitnet_train.runtimes import ENGINES

    job = json.loads(Path(job_file).read_text())
    ids = job["ids"]
    with ENGINES[job["engine"]](job["path"], n_ctx=max(64, len(ids) + 8), threads=job["threads"],
                                all_logits=True) as rt:
        logits, toks = rt.probe(ids, job["text"])
        np.save(job["out"], logits)
    print(json.dumps({"tokens": toks}))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
