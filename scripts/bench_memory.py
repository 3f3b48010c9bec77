#!/usr/bin/env python3
"""Peak memory and speed of a CPU training step: BitNet vs full precision vs stock AutoBitLinear.

Each configuration runs in its own process (a fresh allocator, its own peak RSS): a preset built
with ``quant: bitnet`` (our BitLinear), ``quant: none`` (nn.Linear, the full-precision baseline)
and ``stock`` (the same model with transformers' ``AutoBitLinear``, online quantization, eager:
the worker runs with ``TORCHDYNAMO_DISABLE=1``). One step = forward, loss, backward, AdamW step,
fp32. After one warm-up step (which also creates AdamW's state) the process resets its peak RSS
(``/proc/self/clear_refs``) and times ``--steps`` steps: the printed peak is the high-water mark
of those steady-state steps, tokens/s the median step. The configurations alternate within each
round (``--rounds``) so machine load affects them alike; ratios are to ``none`` of the same round.
"step MiB" is the peak above the RSS of the built model (before the first step), the step's own
memory without the interpreter, libraries and weights that every configuration holds alike.
"alloc MiB" is the peak of the bytes the C allocator has handed out and not yet taken back
(glibc's ``mallinfo2``: ``uordblks + hblkhd``), sampled every millisecond by a thread during one
more, untimed step: the memory the step's tensors need, without what the allocator keeps resident
after a free (the RSS peak includes that; see docs/performance.md on how far apart they are).
"saved MiB" is exact rather than sampled: the bytes of the distinct storages autograd keeps for
backward in one forward (``saved_tensors_hooks``; parameters excluded).

    python scripts/bench_memory.py [--presets tiny,125m,350m] [--batch 4] [--seq 256]
        [--steps 3] [--rounds 1] [--threads 2] [--code DIR] [--lock /tmp/cpu.lock]
    python scripts/bench_memory.py --in-process --presets tiny:16x128,125m:2x256 --steps 9

``--in-process``: speed only, the fairest ratio — ``quant: bitnet`` and ``quant: none`` built from the
same preset and seed in this one process, their steps (forward, loss, backward, clipping, AdamW, state
made up front as ``pretrain`` does; fp32, random tokens) timed in turn after a warm-up step
(``bench_harness.alternated_medians``); tokens/s and BitNet / fp. A preset may carry its own batch as
``NAME:BATCHxSEQ``.

``--code DIR`` runs the workers on another checkout's ``bitnet_train`` (its directory is put
first on PYTHONPATH), e.g. ``--code /work/main`` for the figures before a change.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

QUANTS = ("bitnet", "none", "stock")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


MALLOCS = {"glibc": None, "jemalloc": ("libjemalloc.so",), "tcmalloc": ("libtcmalloc_minimal.so", "libtcmalloc.so")}


def _find_malloc(name: str) -> str | None:
    """The path of a shared library of allocator ``name`` (``MALLOCS``), from ``ldconfig -p`` or the
    lib directory of this Python's prefix (a venv or conda environment); None if there is none."""
    stems = MALLOCS[name]
    dirs = [os.path.join(p, "lib") for p in (sys.prefix, os.environ.get("CONDA_PREFIX") or "") if p]
    for d in dirs:
        for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if f.startswith(stems):
                return os.path.join(d, f)
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    for stem in stems:
        for line in out.splitlines():
            lib, _, path = line.strip().partition(" => ")
            if lib.startswith(stem) and path:
                return path.strip()
    return None


def _loaded_malloc() -> str:
    """Which allocator of ``MALLOCS`` this process runs on (a preloaded one is mapped in)."""
    with open("/proc/self/maps") as f:
        maps = f.read()
    for name, stems in MALLOCS.items():
        if stems and any(stem in maps for stem in stems):
            return name
    return "glibc"


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _allocated_bytes():
    """A function returning the bytes glibc's malloc has handed out now (None without glibc >= 2.33)."""
    import ctypes

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def now() -> int:
        m = fn()
        return m.uordblks + m.hblkhd  # in-use heap chunks + mmapped chunks

    return now


def _sampled_peak(now, work) -> int:
    """Run ``work()`` while a thread samples ``now()`` every millisecond; the highest sample."""
    import threading

    peak = [now()]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], now())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        work()
    finally:
        done.set()
        t.join()
    return max(peak[0], now())


def _stockify(model) -> int:
    """Swap every nn.Linear but the head for transformers' AutoBitLinear (online), weights copied."""
    import torch.nn as nn
    from transformers.integrations.bitnet import AutoBitLinear

    n = 0
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and not name.endswith("lm_head"):
            new = AutoBitLinear(mod.in_features, mod.out_features, bias=mod.bias is not None, online_quant=True,
                                device=mod.weight.device, dtype=mod.weight.dtype)
            new.weight = mod.weight
            if mod.bias is not None:
                new.bias = mod.bias
            model.set_submodule(name, new)
            n += 1
    return n


def worker(args) -> None:
    import torch

    import bitnet_train

    torch.set_num_threads(args.threads)
    quant = "none" if args.quant == "stock" else args.quant
    model = bitnet_train.build_model(args.preset, quant=quant, seed=0, **({"backend": "torch"} if quant == "bitnet" else {}))
    if args.weight_codes is not None:
        recompute = args.weight_codes == "recompute"
        if hasattr(bitnet_train.layers.bitlinear, "set_switches"):
            bitnet_train.layers.bitlinear.set_switches(model, recompute_weight_codes=recompute)
        elif hasattr(bitnet_train.BitLinear, "recompute_weight_codes"):  # an older checkout (--code): a class switch
            bitnet_train.BitLinear.recompute_weight_codes = recompute
    if args.quant == "stock":
        assert os.environ.get("TORCHDYNAMO_DISABLE") == "1"
        _stockify(model)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    try:
        from bitnet_train.training.optim import build_optimizer, init_adamw_state
    except ImportError:  # an older checkout (--code): its AdamW, state made in the first step
        opt, made = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1), 0
    else:  # the pretraining optimizer, as pretrain() makes it (its state before the first forward)
        opt = build_optimizer(model, 1e-4, 0.1)
        made = init_adamw_state(opt) if args.optim_state == "eager" else 0
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)

    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):  # the tensors autograd keeps for backward, by storage (no parameters)
        st = t.untyped_storage()
        if st.data_ptr() not in param_storages and t.device.type != "meta":
            saved[st.data_ptr()] = st.nbytes()
        return t

    def step(track=False):
        if track:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    rss_built = _rss_kib("VmRSS")
    step(track=True)  # warm-up (creates AdamW's state if not made above); records what the forward saves
    rss_before = _rss_kib("VmRSS")
    reset = _reset_peak()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    hwm = _rss_kib("VmHWM")
    malloc = _loaded_malloc()
    now = _allocated_bytes() if malloc == "glibc" else None  # mallinfo2 sees glibc's heap only
    alloc = _sampled_peak(now, step) / 2**20 if now is not None else None
    out = {
        "preset": args.preset, "quant": args.quant, "params": params, "tokens": args.batch * args.seq,
        "peak_mib": hwm / 1024, "alloc_mib": alloc, "saved_mib": sum(saved.values()) / 2**20, "rss_built_mib": rss_built / 1024, "rss_before_mib": rss_before / 1024,
        "peak_reset": reset, "step_s": statistics.median(times), "tokens_per_s": args.batch * args.seq / statistics.median(times),
        "code": os.path.dirname(os.path.dirname(bitnet_train.__file__)), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "malloc": malloc, "optim_state": "eager" if made else "lazy",
    }
    print("RESULT " + json.dumps(out), flush=True)


def run_one(args, preset: str, quant: str) -> dict:
    env = dict(os.environ)
    if args.malloc_path:
        env["LD_PRELOAD"] = args.malloc_path
    env["OMP_NUM_THREADS"] = str(args.threads)
    if quant == "stock":
        env["TORCHDYNAMO_DISABLE"] = "1"  # transformers compiles its quantizers otherwise (see facts)
    if args.code:
        env["PYTHONPATH"] = os.path.abspath(args.code) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--preset", preset, "--quant", quant,
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads)]
    if args.weight_codes:
        cmd += ["--weight-codes", args.weight_codes]
    cmd += ["--optim-state", args.optim_state]
    if args.lock:
        cmd = ["flock", args.lock] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        sys.exit(f"worker {preset}/{quant} failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    if out.get("malloc", "glibc") != args.malloc:
        sys.exit(f"worker {preset}/{quant} ran on {out.get('malloc')}, not --malloc {args.malloc} ({args.malloc_path})")
    return out


def _step_fn(model, opt, batch, seq_len, vocab, seed):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)

    def step():
        x = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    return step


def in_process(preset: str, batch: int, seq_len: int, steps: int) -> dict:
    """BitNet and full precision of one preset, their training steps timed in turn in this process."""
    import torch

    from bench_harness import alternated_medians
    from bitnet_train.modeling.models import build_model
    from bitnet_train.training.optim import build_optimizer, init_adamw_state

    fns, n_params = {}, None
    for quant in ("bitnet", "none"):
        model = build_model(preset, quant=quant, seed=0).to(torch.float32).train()
        n_params = n_params or sum(p.numel() for p in model.parameters())
        opt = build_optimizer(model, 1e-3, 0.1)  # the pretraining optimizer, its state made up front
        init_adamw_state(opt)
        fns[quant] = _step_fn(model, opt, batch, seq_len, model.config.vocab_size, seed=1)
    t_bit, t_fp = alternated_medians([fns["bitnet"], fns["none"]], repeats=steps, warmup=1)
    tokens = batch * seq_len
    return {"preset": preset, "params": n_params, "tokens_per_step": tokens, "bitnet_tok_s": tokens / t_bit,
            "fp_tok_s": tokens / t_fp, "ratio": t_fp / t_bit, "steps": steps}


def run_in_process(args) -> None:
    import torch

    from bench_harness import machine_line, write_json

    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    print(f"in one process, alternated, median of {args.steps} steps after 1 warm-up, fp32")
    print("| model | parameters (BitNet) | tokens/step | BitNet tok/s | fp tok/s | BitNet / fp |")
    print("|---|---|---|---|---|---|")
    results = []
    for item in [p for p in args.presets.split(",") if p]:
        preset, _, shape = item.partition(":")
        batch, seq = map(int, shape.split("x")) if shape else (args.batch, args.seq)
        r = in_process(preset, batch, seq, args.steps)
        results.append(r)
        print(f"| {preset} | {r['params'] / 1e6:.1f}M | {r['tokens_per_step']} | {r['bitnet_tok_s']:,.0f} | "
              f"{r['fp_tok_s']:,.0f} | {r['ratio']:.2f}x |", flush=True)
    write_json(args.json, {"in_process": results})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,125m,350m")
    ap.add_argument("--quants", default=",".join(QUANTS), help="subset of bitnet,none,stock (none is the baseline)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process, after one warm-up step")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--code", default=None, help="a checkout whose bitnet_train the workers import")
    ap.add_argument("--lock", default=None, help="run each worker under `flock LOCK`")
    ap.add_argument("--json", default=None, help="also write all results to this file")
    ap.add_argument("--weight-codes", choices=("recompute", "cache"), default=None,
                    help="the BitLinear switch recompute_weight_codes True (recompute) or False (cache); default: the library's")
    ap.add_argument("--malloc", choices=tuple(MALLOCS), default="glibc",
                    help="the C allocator of the workers: glibc's malloc (the default) or jemalloc / tcmalloc, "
                         "preloaded (LD_PRELOAD) from ldconfig's paths or this Python's prefix")
    ap.add_argument("--optim-state", choices=("eager", "lazy"), default="eager",
                    help="AdamW's state made before the first forward, as pretrain() does (eager), or in the first step (lazy)")
    ap.add_argument("--in-process", action="store_true",
                    help="speed only: BitNet and fp of each preset timed in turn in this process (no memory figures)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--preset", help=argparse.SUPPRESS)
    ap.add_argument("--quant", choices=QUANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.in_process:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_harness, beside this script
        run_in_process(args)
        return
    args.malloc_path = None
    if args.malloc != "glibc":
        args.malloc_path = _find_malloc(args.malloc)
        if args.malloc_path is None:
            sys.exit(f"--malloc {args.malloc}: no {' or '.join(s + '*' for s in MALLOCS[args.malloc])} found "
                     f"(ldconfig -p, {sys.prefix}/lib); install it (Debian/Ubuntu: apt install "
                     f"{'libjemalloc2' if args.malloc == 'jemalloc' else 'libtcmalloc-minimal4'}; conda: conda install "
                     f"{'jemalloc' if args.malloc == 'jemalloc' else 'gperftools'})")
    quants = [q for q in args.quants.split(",") if q]
    if "none" not in quants or any(q not in QUANTS for q in quants):
        sys.exit(f"--quants must name 'none' (the baseline) and only {', '.join(QUANTS)}; got {args.quants!r}")
    results = []
    print(f"batch {args.batch} x {args.seq} tokens, {args.steps} timed steps after 1 warm-up, {args.threads} threads, "
          f"fp32 AdamW (state {args.optim_state}), malloc: {args.malloc_path or 'glibc'}, code: {args.code or 'this checkout'}",
          flush=True)
    print(f"{'preset':<6} {'round':>5} {'quant':<7} {'params':>11} {'peak MiB':>9} {'/ none':>7} "
          f"{'step MiB':>9} {'/ none':>7} {'alloc MiB':>9} {'/ none':>7} {'saved MiB':>9} {'/ none':>7} {'tok/s':>8} {'/ none':>7}", flush=True)
    for preset in [p for p in args.presets.split(",") if p]:
        for rnd in range(args.rounds):
            row = {q: run_one(args, preset, q) for q in quants}
            base = row["none"]
            for q in quants:
                r = row[q]
                r["round"] = rnd
                r["peak_ratio"] = r["peak_mib"] / base["peak_mib"]
                # the step's own memory: peak above the RSS of the built model (imports, weights)
                r["step_mib"] = r["peak_mib"] - r["rss_built_mib"]
                r["step_ratio"] = r["step_mib"] / (base["peak_mib"] - base["rss_built_mib"])
                r["speed_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
                r["alloc_ratio"] = r["alloc_mib"] / base["alloc_mib"] if r["alloc_mib"] and base["alloc_mib"] else None
                alloc = (f"{r['alloc_mib']:>9.0f} {r['alloc_ratio']:>6.3f}x" if r["alloc_ratio"] is not None
                         else f"{'n/a':>9} {'':>7}")
                results.append(r)
                print(f"{preset:<6} {rnd:>5} {q:<7} {r['params']:>11,} {r['peak_mib']:>9.0f} {r['peak_ratio']:>6.3f}x "
                      f"{r['step_mib']:>9.0f} {r['step_ratio']:>6.3f}x {alloc} {r['saved_mib']:>9.0f} "
                      f"{r['saved_mib'] / base['saved_mib']:>6.3f}x {r['tokens_per_s']:>8.1f} {r['speed_ratio']:>6.3f}x",
                      flush=True)
            if "stock" in row and "bitnet" in row:
                b, s = row["bitnet"], row["stock"]
                print(f"{preset:<6} {rnd:>5} bitnet / stock AutoBitLinear: peak {b['peak_mib'] / s['peak_mib']:.3f}x, "
                      f"tokens/s {b['tokens_per_s'] / s['tokens_per_s']:.3f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
