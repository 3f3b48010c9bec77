#!/usr/bin/env python3
"""ik_llama.cpp exports of ReLU² models, measured on this machine.

``tolerances``: how far ik_llama.cpp's logits are from our model's, per format, over widths and
seeds, trained and not: the figures behind the ik entries of ``bitnet_train.export.verify.TOLERANCES``.
For each (width, seed, steps) a ReLU² tiny-preset model (2 layers, byte-level BPE of 512 tokens
trained on the text) is trained ``steps`` steps with AdamW (0: random init), exported to each format
(``export(..., verify=False)``), run in ik_llama.cpp on a held-out probe of 128 tokens, and compared
with the trainer's forward (relative logit error, top-1 agreement) and, for F32/F16, with our model
with ik's float arithmetic emulated (no activation quantization).

    python scripts/bench_ik.py tolerances [--widths 256,512] [--seeds 0,1] [--steps 0,40] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO / "tests" / "data" / "tinyshakespeare.txt"
FFN = {256: 704, 512: 1408}  # the tiny preset's FFN at 256; 2.75x at other widths


def train_checkpoint(out: Path, text: str, width: int, seed: int, steps: int) -> Path:
    import torch

    from bitnet_train.checkpoint import save_checkpoint
    from bitnet_train.model import build_model
    from bitnet_train.tokenizer import train_bpe

    train = text[:-5000]
    tok = train_bpe([train[i : i + 20_000] for i in range(0, len(train), 20_000)], vocab_size=512)
    ffn = FFN.get(width, int(width * 2.75) // 64 * 64)
    model = build_model("tiny", seed=seed, backend="torch", vocab_size=len(tok), hidden_size=width,
                        intermediate_size=ffn, num_hidden_layers=2)
    if steps:
        ids = torch.tensor(tok(train)["input_ids"])
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(steps):
            ix = torch.randint(0, len(ids) - 65, (16,), generator=g)
            x = torch.stack([ids[i : i + 64] for i in ix])
            loss = model(x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_checkpoint(model, out, tokenizer=tok)
    return out


def tolerances(args) -> int:
    import numpy as np

    from bitnet_train.export import export, ik
    from bitnet_train.export import verify as V
    from bitnet_train.export.source import CheckpointSource, load_tokenizer_for

    text = Path(args.text).read_text(encoding="utf-8")
    probe = text[-3000:]  # held out: training uses the text before its last 5000 characters
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_ik_"))
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            for steps in (int(s) for s in args.steps.split(",")):
                ck = train_checkpoint(work / f"w{width}-seed{seed}-steps{steps}", text, width, seed, steps)
                src = CheckpointSource(ck)
                tok = load_tokenizer_for(src)
                ids = V.probe_ids(tok, probe, 128)
                ours = V.our_logits(ck, ids)
                for quant in args.quants.split(","):
                    if ik.shape_problems(src, quant):
                        continue
                    out = work / f"{ck.name}-{quant}.gguf"
                    export(ck, "gguf", out, quant=quant, runtime="ik_llama.cpp", verify=False, log=lambda *a: None)
                    theirs, _ = ik.ik_logits(out, ids)
                    row = {"width": width, "seed": seed, "steps": steps, "quant": quant,
                           "rel_error": V.rel_error(theirs, ours),
                           "top1": float(np.mean(theirs.argmax(-1) == ours.argmax(-1)))}
                    if quant in ("f16", "f32"):
                        row["emulated_rel"] = V.rel_error(theirs, V.our_logits(ck, ids, emulate=quant))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print("\nformat      max rel error   min top-1   max emulated rel (F16/F32)   over", len(rows) // max(1, len(
        {r["quant"] for r in rows})), "models")
    for quant in dict.fromkeys(r["quant"] for r in rows):
        rs = [r for r in rows if r["quant"] == quant]
        em = [r["emulated_rel"] for r in rs if "emulated_rel" in r]
        print(f"{quant:10s}  {max(r['rel_error'] for r in rs):.2e} ({len(rs)})   {min(r['top1'] for r in rs):.3f}"
              f"       {max(em):.2e}" if em else f"{quant:10s}  {max(r['rel_error'] for r in rs):.2e} ({len(rs)})   "
              f"{min(r['top1'] for r in rs):.3f}")
        for steps in sorted({r["steps"] for r in rs}):
            sub = [r["rel_error"] for r in rs if r["steps"] == steps]
            print(f"    steps {steps}: rel error {min(sub):.2e} .. {max(sub):.2e}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tolerances", help="logit agreement of ik_llama.cpp exports vs our model")
    t.add_argument("--widths", default="256,512")
    t.add_argument("--seeds", default="0,1")
    t.add_argument("--steps", default="0,40")
    t.add_argument("--quants", default="f32,f16,iq2_bn,iq2_bn_r4,iq1_bn")
    t.add_argument("--text", default=str(TEXT))
    t.add_argument("--work", help="directory for the checkpoints and files (default: a new temporary one)")
    t.set_defaults(func=tolerances)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rc = args.func(args)
    print(f"[{time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
