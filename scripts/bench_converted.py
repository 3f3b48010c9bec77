#!/usr/bin/env python3
"""A trained ternary checkpoint in every GGUF that runs it: file size, verification, held-out bits per byte
in the runtime beside the checkpoint's, and prefill / decode tokens/s, against the F16 file of the same
model in the same run (made for a converted and QAT'd or distilled SmolLM2-135M, docs/runtimes.md).

For each of ``--formats`` (``QUANT`` or ``QUANT+EMBED``: ``export --quant QUANT --embed-type EMBED``; the
runtime is the format's, :mod:`bitnet_train.export.formats`) and the F16 file: ``bitnet-train export`` with
verification (its figures: relative logit error against our forward and against the emulation of the
runtime's arithmetic where the format has one), then ``bitnet-train eval`` of the file on ``--val-text``
(packed windows of ``--seq-len``, as the checkpoint is scored), then speed: a ``--prompt-tokens`` prompt in
one batch and ``--tokens`` greedy tokens on ``--threads`` threads, files alternated over ``--rounds``
(median). A format the model's shape rules out is reported and skipped.

    python scripts/bench_converted.py --checkpoint CK --val-text FILE [--formats q2_0,q2_0+q8_0,iq2_bn]
        [--work DIR] [--threads 2] [--tokens 32] [--prompt-tokens 128] [--rounds 3] [--seq-len 512]
        [--json OUT.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--val-text", required=True, help="held-out text, never trained on")
    ap.add_argument("--formats", default="q2_0,q2_0+q8_0,iq2_bn,iq2_bn+q8_0")
    ap.add_argument("--work", default="out/bench-converted")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    from bench_harness import gguf_speed, machine, machine_line, table, write_json

    from bitnet_train.errors import ExportError
    from bitnet_train.evaluation.evaluate import evaluate
    from bitnet_train.export import export

    m = machine(("torch", "transformers", "llama_cpp", "ik_llama_cpp"))
    print(machine_line(m), flush=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    ours = evaluate(args.checkpoint, args.val_text, seq_len=args.seq_len, progress=False)["bits_per_byte"]
    print(f"checkpoint {args.checkpoint}: {ours:.4f} bits per byte on {args.val_text} ({time.perf_counter() - t:.0f} s)",
          flush=True)

    rows: dict[str, dict] = {}
    for name in ["f16"] + [f for f in args.formats.split(",") if f and f != "f16"]:
        quant, _, embed = name.partition("+")
        out = work / f"{name}.gguf"
        try:
            r = export(args.checkpoint, "gguf", out, quant=quant, embed_type=embed or None, log=lambda *a: None)
        except ExportError as e:
            print(f"{name}: not exported: {e}", flush=True)
            continue
        ag = r["agreement"]
        bpb = evaluate(str(out), args.val_text, seq_len=args.seq_len, progress=False)["bits_per_byte"]
        rows[name] = {"runtime": r["runtime"], "arch": r["arch"], "embed_type": r.get("embed_type"),
                      "bytes": out.stat().st_size, "rel_error": ag.rel_error if ag else None,
                      "emulated_rel": ag.emulated_rel if ag else None, "verified": bool(ag and ag.ok),
                      "bits_per_byte": bpb, "path": str(out)}
        print(f"{name}: {r['runtime']} {r['arch']}, {out.stat().st_size / 2**20:.1f} MiB, {bpb:.4f} bits per byte "
              f"({bpb / ours - 1:+.2%} vs the checkpoint); {ag}", flush=True)

    import numpy as np

    prompt = [int(i) for i in np.random.default_rng(0).integers(3, 400, args.prompt_tokens)]
    speeds: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}
    for _ in range(args.rounds):
        for name, row in rows.items():
            speeds[name].append(gguf_speed(row["path"], args.threads, prompt, args.tokens))
    for name, v in speeds.items():
        rows[name]["prefill_tokens_per_s"] = statistics.median(p for p, _ in v)
        rows[name]["decode_tokens_per_s"] = statistics.median(d for _, d in v)

    f16 = rows["f16"]
    print(f"\n{args.checkpoint}: held-out bits per byte {ours:.4f} in our forward; {args.threads} threads, prefill "
          f"{args.prompt_tokens} tokens, decode {args.tokens} (median of {args.rounds}, files alternated)")
    body = []
    for name, r in rows.items():
        emu = f"{r['emulated_rel']:.1e}" if r["emulated_rel"] is not None else "-"
        body.append([name, r["runtime"], f"{r['bytes'] / 2**20:.1f}", f"{r['bytes'] / f16['bytes']:.3f}x",
                     f"{r['rel_error']:.1e}", emu, "yes" if r["verified"] else "NO", f"{r['bits_per_byte']:.4f}",
                     f"{r['bits_per_byte'] / ours - 1:+.2%}", f"{r['prefill_tokens_per_s']:.1f}",
                     f"{r['decode_tokens_per_s']:.2f}",
                     f"{r['decode_tokens_per_s'] / f16['decode_tokens_per_s']:.2f}x"])
    for line in table(["file", "runtime", "MiB", "vs F16", "logits vs ours", "vs emulated", "verified",
                       "bits/byte", "vs checkpoint", "prefill tok/s", "decode tok/s", "decode vs F16"], body):
        print(line)
    write_json(args.json, {"machine": m, "args": vars(args), "checkpoint_bits_per_byte": ours, "files": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
