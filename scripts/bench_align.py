"""Alignment figures for docs/performance.md: held-out exact match before/after SFT, held-out preference
accuracy before/after DPO, and tokens/s of each stage, on the tiny verifiable task.

    python scripts/bench_align.py --write-data          # (re)write recipes/data/{sft,dpo}-tiny.jsonl
    python scripts/bench_align.py [--pretrained runs/tiny/final] [--out runs/bench-align]

Runs recipes/sft-tiny.yaml then recipes/dpo-tiny.yaml (through the CLI, --set for the paths) on
the pretrained checkpoint. tokens/s: non-padding tokens the trainer's collator fed to the policy
per second of training (DPO: chosen and rejected sequences; the reference forward is extra work
not counted). With --dpo-lr-2b4t it also runs DPO at the 2B4T report's 2e-7 for comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import align_task as T  # noqa: E402


def write_data() -> None:
    held, train = T.split(T.triples(T.TINY_WORDS))
    d = REPO / "recipes" / "data"
    d.mkdir(exist_ok=True)
    T.write_jsonl(T.sft_rows(train), d / "sft-tiny.jsonl")
    T.write_jsonl(T.dpo_rows(train), d / "dpo-tiny.jsonl")
    print(f"wrote {d}/sft-tiny.jsonl and dpo-tiny.jsonl ({len(train)} rows each; {len(held)} triples held out)")



def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write-data", action="store_true")
    ap.add_argument("--pretrained", default=str(REPO / "runs/tiny/final"))
    ap.add_argument("--out", default=str(REPO / "runs/bench-align"))
    ap.add_argument("--dpo-lr-2b4t", action="store_true", help="also run DPO at lr 2e-7 (2B4T report)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for both stages")
    a = ap.parse_args()
    from bench_harness import machine_line

    print(machine_line(), flush=True)
    if a.write_data:
        write_data()
        return 0
    import time

    from transformers import AutoTokenizer

    from bitnet_train.align import dpo, load_dpo_recipe, load_sft_recipe, sft
    from bitnet_train.modeling.models import load_model

    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    pre = Path(a.pretrained)
    tok = AutoTokenizer.from_pretrained(pre)
    held, _ = T.split(T.triples(T.TINY_WORDS))
    em_pre = T.exact_match(load_model(pre), tok, held)
    pref_pre = T.preference_accuracy(load_model(pre), tok, held)

    r = load_sft_recipe(REPO / "recipes/sft-tiny.yaml",
                        [f"model={pre}", f"output_dir={out / 'sft'}", f"data.path={REPO / 'recipes/data/sft-tiny.jsonl'}"]
                        + a.overrides)
    t0 = time.perf_counter()
    s = sft(r, progress=False)
    sft_wall = time.perf_counter() - t0
    m = load_model(out / "sft" / "final")
    em_sft, pref_sft = T.exact_match(m, tok, held), T.preference_accuracy(m, tok, held)

    def run_dpo(name, extra):
        r = load_dpo_recipe(REPO / "recipes/dpo-tiny.yaml",
                            [f"model={out / 'sft' / 'final'}", f"output_dir={out / name}",
                             f"data.path={REPO / 'recipes/data/dpo-tiny.jsonl'}"] + a.overrides + extra)
        t0 = time.perf_counter()
        s = dpo(r, progress=False)
        wall = time.perf_counter() - t0
        m = load_model(out / name / "final")
        return s, wall, T.exact_match(m, tok, held), T.preference_accuracy(m, tok, held), r

    d, dpo_wall, em_dpo, pref_dpo, dr = run_dpo("dpo", [])
    print(f"pretrained {pre}: held-out exact match {em_pre:.3f}, preference accuracy {pref_pre:.3f}")
    print(f"SFT  ({r.train.max_steps} steps, lr {r.train.lr:g}): exact match {em_pre:.3f} -> {em_sft:.3f}; "
          f"{s['tokens']:,} tokens in {sft_wall:.0f} s, {s['tokens_per_s']:,.0f} tokens/s")
    print(f"DPO  ({dr.train.max_steps} steps, lr {dr.train.lr:g}, beta {dr.train.beta:g}): preference accuracy "
          f"{pref_sft:.3f} -> {pref_dpo:.3f} (exact match on the SFT task {em_sft:.3f} -> {em_dpo:.3f}); "
          f"{d['tokens']:,} tokens in {dpo_wall:.0f} s, {d['tokens_per_s']:,.0f} tokens/s")
    if a.dpo_lr_2b4t:
        d2, w2, _, pref2, dr2 = run_dpo("dpo-2e-7", ["train.lr=2e-7"])
        print(f"DPO at lr 2e-7 ({dr2.train.max_steps} steps): preference accuracy {pref_sft:.3f} -> {pref2:.3f}")
    pm = REPO / "runs/tiny/metrics.jsonl"
    if pm.is_file():
        tps = sorted(r["tokens_per_s"] for r in map(json.loads, pm.read_text().splitlines()) if "tokens_per_s" in r)
        if tps:
            print(f"pretrain (runs/tiny/metrics.jsonl, median over steps): {tps[len(tps) // 2]:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
