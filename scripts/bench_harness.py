"""The harness every timing script in ``scripts/`` uses: what a figure was measured on, the timing of
a candidate against its baseline in the same process, and the results as a table and as JSON.

    from bench_harness import machine, alternated_medians, write_json

* :func:`machine`: the CPU (model, cores this process may use, torch's threads, the int8 matmul
  instructions oneDNN uses: AVX-512, VNNI, AMX), the GPU if any, and the versions that matter;
  :func:`machine_line` is its one-line form, printed first by every script.
* :func:`alternated_medians`: callables timed in turn, round after round, so that a change in the
  machine's load during the run reaches every one of them alike; the median of each.
* :func:`table` and :func:`write_json`: a fixed-width table, and the rows with the machine in a
  JSON file (rewritten atomically, so a run cut short keeps what it measured).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(names=("torch", "transformers", "accelerate", "trl", "triton", "llama_cpp")) -> dict:
    """Each package's version, ``not installed`` where it does not import."""
    out = {}
    for name in names:
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - absent or broken: reported, not fatal
            out[name] = "not installed"
    return out


def machine(packages=("torch", "transformers")) -> dict:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    from bitnet_train.cpu_features import cpu_features

    isa = cpu_features()
    m = {"cpu": _cpu_model(), "cores": cores, "threads": torch.get_num_threads(),
         "isa": isa or ["none of AVX-512/AVX-512 BF16/VNNI/AMX"], "capability": torch.backends.cpu.get_cpu_capability(),
         "python": platform.python_version(), "versions": versions(packages)}
    if torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name(0)
    return m


def machine_line(m: dict | None = None) -> str:
    m = m or machine()
    gpu = f"; GPU {m['gpu']}" if "gpu" in m else ""
    ver = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return (f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, {m['capability']} "
            f"({', '.join(m['isa'])}){gpu}; Python {m['python']}, {ver}")


def alternated_medians(forms, repeats: int, inner: int = 1, warmup: int = 1) -> list[float]:
    """Median seconds per call of each callable, timed in turn ``repeats`` rounds (``inner`` calls a
    round) after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for f in forms:
            f()
    times = [[] for _ in forms]
    for _ in range(repeats):
        for f, ts in zip(forms, times):
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            ts.append((time.perf_counter() - t0) / inner)
    return [statistics.median(ts) for ts in times]


def table(header: list[str], rows: list[list], widths: list[int] | None = None) -> list[str]:
    """Lines of a fixed-width table (the first column left-aligned, the others right-aligned)."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = widths or [max(len(r[i]) for r in cells) for i in range(len(header))]
    return [" ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]


def write_json(path: str | os.PathLike | None, result: dict) -> None:
    """Write ``result`` (with :func:`machine` under ``machine`` unless it has one) to ``path``, atomically."""
    if path is None:
        return
    path = Path(path)
    result.setdefault("machine", machine())
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def gguf_speed(path: str | os.PathLike, threads: int, prompt: list[int], tokens: int,
               runtime: str | None = None) -> tuple[float, float]:
    """(prefill tokens/s of ``prompt`` in one batch, greedy decode tokens/s over ``tokens``) of a GGUF in
    ``runtime`` (default the one that computes it, :func:`bitnet_train.runtimes.engine_for`): ik_llama.cpp
    through its C API, llama.cpp through llama-cpp-python; loaded fresh for this one timing."""
    from bitnet_train.runtimes import engine_for

    runtime = runtime or engine_for(path)
    if runtime == "ik_llama.cpp":
        from bitnet_train.runtimes import IkLlama

        rt = IkLlama(path, n_ctx=len(prompt) + tokens + 8, threads=threads)
        t0 = time.perf_counter()
        logits = rt.eval(prompt)[-1]
        t1 = time.perf_counter()
        for _ in range(tokens):
            logits = rt.eval([int(logits.argmax())])[-1]
        t2 = time.perf_counter()
        rt.close()
    elif runtime == "llama.cpp":
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + tokens + 8, n_threads=threads,
                              n_threads_batch=threads, n_batch=512, verbose=False)
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(tokens):
            llm.eval([llm.sample(temp=0.0, top_k=1)])
        t2 = time.perf_counter()
        llm.close()
    else:
        raise ValueError(f"{path}: runs in {runtime}, which gguf_speed does not time")
    return len(prompt) / (t1 - t0), tokens / (t2 - t1)
