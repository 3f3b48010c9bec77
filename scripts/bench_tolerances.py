#!/usr/bin/env python3
"""How far an export is from the checkpoint it came from: the figures behind the formats' verification
tolerances (``bitnet_train.export.formats``) and ``eval``'s stated agreement (docs/eval.md). Small models
trained here, on tests/data/tinyshakespeare.txt (the last 5,000 characters held out), exported without
verification, then compared with our forward.

``logits --runtime llama.cpp``: the llama.cpp formats that carry rows of 64 (Q2_0, and F32/F16 beside
it) on converted tiny Llamas (tests/test_convert.py's shape, hidden 64), random-initialised and after the
test's full-precision 100 steps + QAT 60 steps, and on SiLU BitNet tiny models (tests/test_export.py's)
at ``--steps``.

``logits --runtime ik_llama.cpp``: ik_llama.cpp's formats on ReLU² tiny-preset models (2 layers,
byte-level BPE of 512 tokens) at ``--widths``, trained ``--steps`` steps (0: random init).

Per file: the relative logit error of the probe (128 tokens: export's default probe for llama.cpp, the
text's last 3,000 characters for ik_llama.cpp; ``--probe``) against our forward and against our
forward with the runtime's arithmetic emulated (``export.verify.emulated_logits``: F16/F32, Q2_0), and
top-1 agreement over the positions not near a tie (as verification counts it: ``export.verify.compare``),
over ``--seeds``; then the worst per format.

``bits-per-byte``: tiny-silu models trained ``--steps`` steps on the first 200k characters, exported to
hf, GGUF F32 and GGUF TQ2_0 and scored by ``eval`` on 40 held-out paragraphs, per document and packed:
bits per byte of each and the relative difference to the checkpoint's. A ReLU² model forced into
llama.cpp's ``bitnet`` graph is scored too (``eval`` refuses that file; the runtime is opened directly
here), to show what a wrong graph costs.

    python scripts/bench_tolerances.py logits --runtime llama.cpp [--seeds 0,1] [--steps 0,40]
    python scripts/bench_tolerances.py logits --runtime ik_llama.cpp [--widths 256,512] [--seeds 0,1] [--steps 0,40]
    python scripts/bench_tolerances.py bits-per-byte [--seeds 0,1] [--steps 0,30]
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
QUANTS = {"llama.cpp": "q2_0,f32,f16", "ik_llama.cpp": "f32,f16,iq2_bn,iq2_bn_r4,iq1_bn"}
PROBES = {"llama.cpp": "default", "ik_llama.cpp": "held-out"}  # as the figures in the docs were measured
sys.path.insert(0, str(REPO / "tests"))  # the tests' model builders


def quiet(*a) -> None:
    pass


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def models(args, work: Path):
    """(label, seed, steps, checkpoint) of the runtime's models, built on demand."""
    from test_export import make_checkpoint

    text = Path(args.text).read_text(encoding="utf-8")
    for seed in _ints(args.seeds):
        if args.runtime == "llama.cpp":
            from test_convert import make_tok, qat_run, save_tiny

            from bitnet_train.cli import main as cli

            d = work / f"llama-{seed}"
            save_tiny("llama", make_tok(), d / "hf", seed=seed)
            cli(["convert", str(d / "hf"), "--out", str(d / "random")])
            yield "converted llama", seed, 0, d / "random"
            yield "converted llama", seed, "100+60", Path(qat_run("llama", make_tok(), d / "qat", seed)[1]["final"])
            for steps in _ints(args.steps):
                yield "tiny-silu BitNet", seed, steps, make_checkpoint(work / f"silu-{seed}-{steps}", text[:200_000],
                                                                       steps=steps, seed=seed)
        else:
            for width in _ints(args.widths):
                for steps in _ints(args.steps):
                    ffn = FFN.get(width, int(width * 2.75) // 64 * 64)
                    ck = make_checkpoint(work / f"w{width}-seed{seed}-steps{steps}", text, preset="tiny", steps=steps,
                                         seed=seed, train_end=-5000, hidden_size=width, intermediate_size=ffn)
                    yield f"ReLU² tiny, width {width}", seed, steps, ck


def logits(args) -> int:
    import numpy as np

    from bitnet_train.export import export
    from bitnet_train.export import verify as V
    from bitnet_train.export.formats import find
    from bitnet_train.export.source import CheckpointSource, load_tokenizer_for
    from bitnet_train.runtimes.isolated import isolated_probe

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_tolerances_"))
    probe = V.DEFAULT_PROBE if (args.probe or PROBES[args.runtime]) == "default" else \
        Path(args.text).read_text(encoding="utf-8")[-3000:]  # held out from training
    rows = []
    print("| model | seed | steps | format | rel. error vs ours | vs emulated | top-1 (positions not near a tie) |")
    print("|---|---|---|---|---|---|---|")
    for label, seed, steps, ck in models(args, work):
        src = CheckpointSource(ck)
        ids = V.probe_ids(load_tokenizer_for(src), probe, 128)
        ours = V.our_logits(ck, ids)
        for quant in (args.quants or QUANTS[args.runtime]).split(","):
            if find(quant, args.runtime).shape_problems(src):
                continue
            out = work / f"{ck.parent.name}-{ck.name}-{quant}.gguf"
            export(ck, "gguf", out, quant=quant, runtime=args.runtime, verify=False, log=quiet)
            theirs, _ = isolated_probe(args.runtime, out, ids)
            em_logits = V.emulated_logits(ck, ids, quant) if quant in V.EMULATIONS else None
            a = V.compare(find(quant, args.runtime), theirs, ours, ours_emulated=em_logits)
            row = {"model": label, "seed": seed, "steps": steps, "quant": quant, "rel_error": a.rel_error,
                   "emulated_rel": a.emulated_rel, "top1": a.top1, "decisive": a.decisive, "positions": a.positions}
            rows.append(row)
            em = "-" if a.emulated_rel is None else f"{a.emulated_rel:.2e}"
            print(f"| {label} | {seed} | {steps} | {quant} | {a.rel_error:.2e} | {em} | {a.top1:.1%} of "
                  f"{a.decisive}/{a.positions} |", flush=True)
    print("\nworst per format:")
    for quant in dict.fromkeys(r["quant"] for r in rows):
        rs = [r for r in rows if r["quant"] == quant]
        em = [r["emulated_rel"] for r in rs if r["emulated_rel"] is not None]
        top1 = [r["top1"] for r in rs if not np.isnan(r["top1"])]  # NaN: no position clear of a tie
        print(f"{quant:10s} rel error {max(r['rel_error'] for r in rs):.2e} over {len(rs)} files, min top-1 "
              + (f"{min(top1):.3f}" if top1 else "-") + (f", vs emulated {max(em):.2e}" if em else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def bits_per_byte(args) -> int:
    from test_export import make_checkpoint

    from bitnet_train.evaluation.evaluate import evaluate, score
    from bitnet_train.export import export
    from bitnet_train.runtimes import LlamaCpp

    text = Path(args.text).read_text(encoding="utf-8")
    seeds, steps = _ints(args.seeds), _ints(args.steps)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        docs = d / "held.jsonl"
        paras = [p.strip() for p in text[200_000:].split("\n\n") if p.strip()][:40]
        docs.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras), encoding="utf-8")
        print("| preset | seed | steps | mode | checkpoint bpb | hf | F32 (llama.cpp) | TQ2_0 (llama.cpp) |")
        print("|---|---|---|---|---|---|---|---|")
        worst = {"hf": 0.0, "f32": 0.0, "tq2_0": 0.0}
        for seed in seeds:
            for n in steps:
                ck = make_checkpoint(d / f"ck{seed}-{n}", text[:200_000], steps=n, seed=seed)
                paths = {"hf": d / f"hf{seed}-{n}"}
                export(ck, "hf", paths["hf"], verify=False, log=quiet)
                for q in ("f32", "tq2_0"):
                    paths[q] = d / f"{q}{seed}-{n}.gguf"
                    export(ck, "gguf", paths[q], quant=q, verify=False, log=quiet)
                for per_doc in (True, False):
                    ours = evaluate(str(ck), str(docs), per_document=per_doc, progress=False)["bits_per_byte"]
                    cells = []
                    for fmt, p in paths.items():
                        theirs = evaluate(str(p), str(docs), per_document=per_doc, progress=False)["bits_per_byte"]
                        rel = abs(theirs / ours - 1)
                        worst[fmt] = max(worst[fmt], rel)
                        cells.append(f"{theirs:.5f} ({rel:.1e})")
                    mode = "per-document" if per_doc else "packed"
                    print(f"| tiny-silu | {seed} | {n} | {mode} | {ours:.5f} | " + " | ".join(cells) + " |", flush=True)
        print("worst relative difference: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
        for n in steps:
            ck = make_checkpoint(d / f"relu{n}", text[:200_000], preset="tiny", steps=n, seed=seeds[0])
            g = d / f"relu{n}.gguf"
            export(ck, "gguf", g, quant="f32", force=True, verify=False, log=quiet)
            ours = evaluate(str(ck), str(docs), per_document=True, progress=False)["bits_per_byte"]
            rt = LlamaCpp(g, n_ctx=512, all_logits=True)
            try:
                theirs = score(rt, str(docs), 512, per_document=True, progress=False)["bits_per_byte"]
            finally:
                rt.close()
            print(f"ReLU² (tiny), seed {seeds[0]}, {n} steps, forced into llama.cpp's bitnet graph (F32): "
                  f"checkpoint {ours:.5f}, llama.cpp {theirs:.5f} bits per byte ({abs(theirs / ours - 1):.1e} relative)")
    return 0


def main(argv=None) -> int:
    from bench_harness import machine, machine_line

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    lg = sub.add_parser("logits", help="logit agreement of exports with our model, per format")
    lg.add_argument("--runtime", choices=tuple(QUANTS), required=True)
    lg.add_argument("--seeds", default="0,1")
    lg.add_argument("--steps", default="0,40", help="training steps of the BitNet models (converted Llamas: 0 and 100+60)")
    lg.add_argument("--widths", default="256,512", help="ik_llama.cpp: hidden sizes of the ReLU² models")
    lg.add_argument("--quants", default=None, help=f"formats (default: {QUANTS})")
    lg.add_argument("--probe", choices=("default", "held-out"), default=None,
                    help="export's default probe or the text's last 3,000 characters (default: "
                         + ", ".join(f"{k}: {v}" for k, v in PROBES.items()) + ")")
    lg.add_argument("--text", default=str(TEXT))
    lg.add_argument("--work", help="directory for the checkpoints and files (default: a new temporary one)")
    lg.add_argument("--json", default=None, help="also write the rows to this file")
    lg.set_defaults(func=logits)
    bp = sub.add_parser("bits-per-byte", help="checkpoint vs its exports, bits per byte in eval")
    bp.add_argument("--seeds", default="0,1")
    bp.add_argument("--steps", default="0,30")
    bp.add_argument("--text", default=str(TEXT))
    bp.set_defaults(func=bits_per_byte)
    args = ap.parse_args(argv)
    print(machine_line(machine(("torch", "transformers", "llama_cpp", "ik_llama_cpp", "gguf"))), flush=True)
    t0 = time.perf_counter()
    rc = args.func(args)
    print(f"[{time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
