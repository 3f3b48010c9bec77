#!/usr/bin/env python3
"""Export memory and llama.cpp speed, measured on this machine.

1. Builds a randomly initialised checkpoint of a preset (default ``700m-silu``) with a byte-level
   BPE trained on ``--text`` (random weights: this measures memory and speed, not quality).
2. Exports it to GGUF in each of ``--quants`` (default F16, TQ2_0, TQ1_0, Q2_0) with each of
   ``--embed-types`` for ``token_embd`` (default: the exporter's; the F16 file keeps an F16 embedding),
   ``--no-verify``, each in a fresh subprocess, and reports the subprocess's peak RSS against the
   checkpoint size, and against the peak RSS of the same subprocess doing everything but the export
   (imports, reading the checkpoint's tensor index) — the baseline. A file is named ``QUANT`` or
   ``QUANT+EMBED`` (e.g. ``q2_0+q6_k``) in the tables; ``f16@ik`` is ik_llama.cpp's F16 file (ik's
   types, ``iq2_bn`` ..., go to ik_llama.cpp by themselves).
3. Loads each GGUF in the runtime that computes it (llama.cpp through llama-cpp-python, ik_llama.cpp
   through its C API) and times greedy decoding: each file's size and decode tokens/s are printed as
   ratios to llama.cpp's F16 file of the same model, measured in this one process, files alternated
   over ``--rounds`` rounds (median).
4. With ``--bitnet-cpp DIR`` (or ``$BITNET_CPP_DIR``), a built bitnet.cpp checkout: also exports
   I2_S and times decoding of F16, TQ2_0 and I2_S in bitnet.cpp with its ``llama-bench``
   (``-p 0 -n TOKENS``), formats alternated over the rounds; ratios to F16 in that runtime.

    python scripts/bench_export.py [--preset 700m-silu] [--work DIR] [--threads N] [--tokens 64]
                                   [--quants f16,tq2_0,q2_0] [--embed-types f16,q8_0,q6_k] [--bitnet-cpp DIR]

Its verification tolerances: ``scripts/bench_tolerances.py logits --runtime llama.cpp``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUANTS = ("f16", "tq2_0", "tq1_0", "q2_0")

# Peak RSS is the child's VmHWM (/proc/self/status): getrusage's ru_maxrss survives exec on
# Linux, so a child forked from this (large) process would report this process's peak.
CHILD = r"""
import json, sys, time
from bitnet_train.export import export
from bitnet_train.export.source import CheckpointSource, load_tokenizer_for
ck, quant, out = sys.argv[1:4]
t = time.perf_counter()
if quant == "baseline":
    src = CheckpointSource(ck)
    load_tokenizer_for(src)
else:
    quant, _, embed = quant.partition("+")
    quant, _, ik = quant.partition("@")
    export(ck, "gguf", out, quant=quant, embed_type=embed or None, runtime="ik_llama.cpp" if ik else None,
           verify=False, log=lambda *a: None)
dt = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"peak_rss": int(hwm.split()[1]) * 1024, "seconds": dt}))
"""


def make_checkpoint(preset: str, out: Path, text: Path) -> None:
    import torch

    from bitnet_train.checkpoint.format import save_checkpoint
    from bitnet_train.modeling.models import build_model, load_preset
    from bitnet_train.data.tokenizer import train_bpe

    data = text.read_text(encoding="utf-8")
    vocab = load_preset(preset)["vocab_size"]
    tok = train_bpe([data[i : i + 50_000] for i in range(0, len(data), 50_000)], vocab_size=vocab)
    # the preset's vocabulary size: tokens the BPE did not fill are padding rows of the embedding
    with torch.no_grad():
        model = build_model(preset, seed=0)
    save_checkpoint(model, out, tokenizer=tok)


def run_child(ck: Path, quant: str, out: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, "-c", CHILD, str(ck), quant, str(out)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"export {quant} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def decode_speed(paths: dict, threads: int, tokens: int, rounds: int) -> dict:
    """Greedy decode tokens/s of each GGUF after a 16-token prompt (median over alternated rounds)."""
    from bench_harness import gguf_speed

    prompt = list(range(3, 19))
    times: dict[str, list[float]] = {q: [] for q in paths}
    for _ in range(rounds):
        for q, p in paths.items():
            times[q].append(gguf_speed(p, threads, prompt, tokens, "ik_llama.cpp" if "@ik" in q else None)[1])
            print(f"  {q}: {times[q][-1]:.2f} tokens/s", flush=True)
    return {q: statistics.median(v) for q, v in times.items()}


def bitnet_cpp_speed(root: Path, paths: dict, threads: int, tokens: int, rounds: int) -> dict:
    """Decode tokens/s of each GGUF in bitnet.cpp's llama-bench (median over alternated rounds)."""
    from bitnet_train.runtimes.bitnetcpp import program

    try:
        bench = program(root, "llama-bench")
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    times: dict[str, list[float]] = {q: [] for q in paths}
    for _ in range(rounds):
        for q, p in paths.items():
            cmd = [str(bench), "-m", str(p), "-p", "0", "-n", str(tokens), "-t", str(threads), "-r", "1", "-o", "json"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"llama-bench failed on {p}:\n{r.stderr[-2000:]}")
            times[q].append(float(json.loads(r.stdout)[0]["avg_ts"]))
            print(f"  bitnet.cpp {q}: {times[q][-1]:.2f} tokens/s", flush=True)
    return {q: statistics.median(v) for q, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="700m-silu")
    ap.add_argument("--work", default="out/bench-export", help="where the checkpoint and GGUF files go")
    ap.add_argument("--text", default=None, help="text for the tokenizer (default: tinyshakespeare next to the repo)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per timing")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quants", default=",".join(QUANTS), help="GGUF --quant values (f16 is always included)")
    ap.add_argument("--embed-types", default="",
                    help="token_embd storages (export --embed-type) for each ternary quant, e.g. f16,q8_0,q6_k "
                    "(default: the exporter's default)")
    ap.add_argument("--decode-only", action="store_true", help="reuse the GGUF files of an earlier run")
    ap.add_argument("--bitnet-cpp", default=os.environ.get("BITNET_CPP_DIR"),
                    help="a built bitnet.cpp checkout: also export I2_S and time F16/TQ2_0/I2_S there")
    args = ap.parse_args()
    from bench_harness import machine_line

    print(machine_line(), flush=True)
    embeds = [e for e in args.embed_types.split(",") if e]
    files = ["f16"] + [q if not embeds or q.startswith("f16") else f"{q}+{e}" for q in args.quants.split(",")
                       if q != "f16" for e in embeds or [None]]
    files = list(dict.fromkeys(files))
    quants = files + (["i2_s"] if args.bitnet_cpp else [])

    repo = Path(__file__).resolve().parents[1]
    text = Path(args.text) if args.text else repo.parent / "shared" / "data" / "tinyshakespeare.txt"
    work = Path(args.work)
    ck = work / f"{args.preset}-ckpt"
    if not (ck / "config.json").is_file():
        t = time.perf_counter()
        make_checkpoint(args.preset, ck, text)
        print(f"built {ck} in {time.perf_counter() - t:.0f} s")
    ck_bytes = sum(f.stat().st_size for f in ck.glob("*.safetensors"))
    print(f"checkpoint {ck}: {ck_bytes / 2**30:.2f} GiB of safetensors (fp32 latent weights)")

    paths, sizes = {}, {}
    if not args.decode_only:
        base = run_child(ck, "baseline", work / "none", args.threads)
        print(f"baseline process (imports, tensor index, tokenizer): peak RSS {base['peak_rss'] / 2**30:.2f} GiB")
        print("| format | file size | export time | peak RSS | peak RSS - baseline | / checkpoint size |")
        print("|---|---|---|---|---|---|")
    for q in quants:
        p = work / f"{args.preset}-{q}.gguf"
        if args.decode_only:
            paths[q], sizes[q] = p, p.stat().st_size
            continue
        r = run_child(ck, q, p, args.threads)
        paths[q], sizes[q] = p, p.stat().st_size
        extra = r["peak_rss"] - base["peak_rss"]
        print(
            f"| {q} | {sizes[q] / 2**20:.0f} MiB | {r['seconds']:.0f} s | {r['peak_rss'] / 2**30:.2f} GiB | "
            f"{extra / 2**20:.0f} MiB | {r['peak_rss'] / ck_bytes:.2f}x |"
        )
    try:
        speed = decode_speed({q: paths[q] for q in files}, args.threads, args.tokens, args.rounds)
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp decode speed")
        speed = None
    if speed:
        print(f"\ndecode, {args.threads} threads, {args.tokens} tokens, median of {args.rounds} rounds:")
        print("| format | file size vs F16 | decode tokens/s | vs F16 |")
        print("|---|---|---|---|")
        for q in files:
            print(f"| {q} | {sizes[q] / sizes['f16']:.3f}x | {speed[q]:.2f} | {speed[q] / speed['f16']:.2f}x |")
    if args.bitnet_cpp:
        bq = ("f16", "tq2_0", "i2_s")
        bspeed = bitnet_cpp_speed(Path(args.bitnet_cpp), {q: paths[q] for q in bq}, args.threads, args.tokens,
                                  args.rounds)
        print(f"\nbitnet.cpp ({args.bitnet_cpp}) llama-bench decode, {args.threads} threads, {args.tokens} tokens, "
              f"median of {args.rounds} rounds:")
        print("| format | file size vs F16 | decode tokens/s | vs F16 |")
        print("|---|---|---|---|")
        for q in bq:
            print(f"| {q} | {sizes[q] / sizes['f16']:.3f}x | {bspeed[q]:.2f} | {bspeed[q] / bspeed['f16']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
