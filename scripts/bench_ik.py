#!/usr/bin/env python3
"""ik_llama.cpp's speed on ReLU² models, measured on this machine (its logit agreement with our model:
``scripts/bench_tolerances.py logits --runtime ik_llama.cpp``).

``speed``: a randomly initialised checkpoint (bf16 latent weights) of a ReLU² preset (default ``700m``) and of its SiLU
twin (``700m-silu``), exported (``--no-verify``, each in a fresh subprocess: its peak RSS, and that of
ik's ``llama-quantize`` it runs, against the checkpoint size) to ik_llama.cpp IQ2_BN, IQ2_BN_R4,
IQ1_BN, F16 and llama.cpp TQ2_0, F16; then prefill (a ``--prompt-tokens`` prompt in one batch) and
greedy decode (``--tokens``) tokens/s on ``--threads`` threads, formats alternated over ``--rounds``
(median), each runtime through its Python binding.

    python scripts/bench_ik.py speed [--preset 700m] [--work out/bench-ik] [--threads 2] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO / "tests" / "data" / "tinyshakespeare.txt"


SPEED_CHILD = r"""
import json, resource, sys, time
from bitnet_train.export import export
ck, quant, out = sys.argv[1:4]
t = time.perf_counter()
r = export(ck, "gguf", out, quant=quant, verify=False, log=lambda *a: None)
dt = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"peak_rss": int(hwm.split()[1]) * 1024, "child_peak_rss": kids, "seconds": dt,
                  "runtime": r["runtime"]}))
"""

# (label, which checkpoint, --quant)
SPEED_FORMATS = (("ik IQ2_BN", "relu2", "iq2_bn"), ("ik IQ2_BN_R4", "relu2", "iq2_bn_r4"),
                 ("ik IQ1_BN", "relu2", "iq1_bn"), ("ik F16", "relu2", "f16"),
                 ("llama.cpp TQ2_0", "silu", "tq2_0"), ("llama.cpp F16", "silu", "f16"))


def _random_checkpoint(preset: str, out: Path, text: str) -> None:
    import torch

    from bitnet_train.checkpoint.format import save_checkpoint
    from bitnet_train.modeling.models import build_model, load_preset
    from bitnet_train.data.tokenizer import train_bpe

    tok = train_bpe([text[i : i + 50_000] for i in range(0, len(text), 50_000)], vocab_size=load_preset(preset)["vocab_size"])
    # bf16 latent weights, built as bf16 (half the RAM of fp32: the 2B4T shape fits 24 GB); the
    # export quantizes them to the same kind of ternary file. The preset's vocabulary: rows the BPE
    # leaves empty are padding.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.no_grad():
            model = build_model(preset, seed=0, dtype=torch.bfloat16)
    finally:
        torch.set_default_dtype(old)
    save_checkpoint(model, out, tokenizer=tok)


def speed(args) -> int:
    import os
    import statistics
    import subprocess

    text = Path(args.text).read_text(encoding="utf-8")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cks = {"relu2": work / f"{args.preset}-ckpt", "silu": work / f"{args.preset}-silu-ckpt"}
    for which, ck in cks.items():
        if not (ck / "config.json").is_file():
            t = time.perf_counter()
            _random_checkpoint(args.preset + ("-silu" if which == "silu" else ""), ck, text)
            print(f"built {ck} in {time.perf_counter() - t:.0f} s", flush=True)
    files = {}
    for label, which, quant in SPEED_FORMATS:
        out = work / f"{args.preset}-{which}-{quant}.gguf"
        files[label] = out
        if args.decode_only and out.is_file():
            continue
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        r = subprocess.run([sys.executable, "-c", SPEED_CHILD, str(cks[which]), quant, str(out)], capture_output=True,
                           text=True, env=env)
        if r.returncode:
            raise SystemExit(f"export {label} failed:\n{r.stderr[-3000:]}")
        m = json.loads(r.stdout.strip().splitlines()[-1])
        ck_bytes = sum(f.stat().st_size for f in cks[which].glob("*.safetensors"))
        print(f"export {label}: {m['seconds']:.0f} s, file {out.stat().st_size / 2**20:.0f} MiB, peak RSS "
              f"{m['peak_rss'] / 2**30:.2f} GiB (its subprocesses, llama-quantize for IQ: {m['child_peak_rss'] / 2**30:.2f} "
              f"GiB), checkpoint "
              f"{ck_bytes / 2**30:.2f} GiB", flush=True)
    import numpy as np
    from bench_harness import gguf_speed

    prompt = [int(i) for i in np.random.default_rng(0).integers(3, 400, args.prompt_tokens)]
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in files}
    for _ in range(args.rounds):
        for label, which, _q in SPEED_FORMATS:
            res[label].append(gguf_speed(files[label], args.threads, prompt, args.tokens))
            print(f"  {label}: prefill {res[label][-1][0]:.1f}, decode {res[label][-1][1]:.2f} tokens/s", flush=True)
    if not args.rounds:
        return 0
    print(f"\n{args.preset}, {args.threads} threads, prefill {args.prompt_tokens} tokens, decode {args.tokens} "
          f"(median of {args.rounds})")
    print("| format | file MiB | prefill tok/s | decode tok/s | decode vs its runtime's F16 |")
    print("|---|---|---|---|---|")
    med = {k: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v)) for k, v in res.items()}
    for label in files:
        f16 = med["ik F16" if label.startswith("ik") else "llama.cpp F16"][1]
        print(f"| {label} | {files[label].stat().st_size / 2**20:.0f} | {med[label][0]:.1f} | {med[label][1]:.2f} | "
              f"{med[label][1] / f16:.2f}x |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("speed", help="export size/RSS and prefill/decode speed, ik_llama.cpp vs llama.cpp")
    sp.add_argument("--preset", default="700m")
    sp.add_argument("--work", default="out/bench-ik")
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--tokens", type=int, default=32)
    sp.add_argument("--prompt-tokens", type=int, default=128)
    sp.add_argument("--rounds", type=int, default=1)
    sp.add_argument("--decode-only", action="store_true", help="reuse the GGUF files of an earlier run")
    sp.add_argument("--text", default=str(TEXT))
    sp.set_defaults(func=speed)
    args = ap.parse_args(argv)
    from bench_harness import machine_line

    print(machine_line(), flush=True)
    t0 = time.perf_counter()
    rc = args.func(args)
    print(f"[{time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
