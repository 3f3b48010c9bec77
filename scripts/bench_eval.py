"""Measurements behind ``bitnet-train eval``'s stated tolerances (docs/eval.md).

``python scripts/bench_eval.py tolerances [--seeds 0,1] [--steps 0,30]``: tiny 2-layer SiLU BitNets
(tiny-silu, 512-token BPE) trained STEPS steps on the first 200k characters of tests/data/tinyshakespeare.txt,
exported to hf, GGUF F32 and GGUF TQ2_0 and scored on 40 held-out paragraphs, per document and packed;
prints bits per byte of each and the relative difference to the checkpoint's. A ReLU² model (tiny preset)
forced into llama.cpp's ``bitnet`` graph is scored too (``eval`` refuses that file; the runtime is opened
directly here), to show what a wrong graph costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def tolerances(seeds: list[int], steps: list[int]) -> None:
    from test_export import make_checkpoint

    from bitnet_train.evaluation.evaluate import evaluate, score
    from bitnet_train.runtimes import LlamaCpp
    from bitnet_train.export import export

    text = (REPO / "tests" / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    quiet = lambda *a: None  # noqa: E731
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tolerances", help="checkpoint vs its exports, bits per byte")
    t.add_argument("--seeds", default="0,1")
    t.add_argument("--steps", default="0,30")
    a = ap.parse_args()
    if a.cmd == "tolerances":
        tolerances([int(s) for s in a.seeds.split(",")], [int(s) for s in a.steps.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
