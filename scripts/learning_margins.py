"""The spread, across seeds and thread counts, of every figure a test asserts was learned.

    python scripts/learning_margins.py [--seeds 0,1,2] [--threads 1,2] [--only align,pretrain,qat]
                                       [--cpu-capability native,avx2,default]

Each (seed, threads, CPU capability) runs in its own process (OMP_NUM_THREADS and
torch.set_num_threads set; ATEN_CPU_CAPABILITY, torch's switch for which CPU kernels it runs, stands
in for another machine: ``native`` leaves it unset), with
the same code the tests run (tests/align_task.py, tests/test_pretrain.py, tests/test_convert.py),
and prints one JSON line; the end is a table of min / max per figure next to the threshold the test
asserts. The tests run seed 0 with the machine's default threads; a threshold is sound when the worst
case here clears it clearly. Figures are written into the tests beside the thresholds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

def worker(kind: str, seed: int) -> dict:
    import torch

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        if kind == "align":
            import align_task as T

            pre = T.pretrain_micro(d, seed=seed)
            sft = T.SFT_TRAIN | json.loads(os.environ.get("MARGINS_SFT", "{}"))
            dpo = T.DPO_TRAIN | json.loads(os.environ.get("MARGINS_DPO", "{}"))
            r = T.run_pipeline(d, pre, seed, sft, dpo)
            return {k: round(v, 4) for k, v in r.items() if isinstance(v, float)} | {
                "sft_nll_drop": round(r["nll_pre"] - r["nll_sft"], 4),
                "dpo_pref_gain": round(r["pref_dpo"] - r["pref_sft"], 4)}
        if kind == "pretrain":
            import test_pretrain as P
            from bitnet_train.training.pretrain import load_pretrain_recipe, pretrain

            recipe = load_pretrain_recipe(P.write_recipe(d, P._shakespeare(), max_steps=60, save_every=30,
                                                         eval_every=30), [f"seed={seed}"])
            pretrain(recipe, progress=False)
            vals = [r["val_loss"] for r in P.read_metrics(recipe.output_dir) if "val_loss" in r]
            return {"val_first": round(vals[0], 4), "val_drop": round(vals[0] - vals[-1], 4)}
        if kind == "qat":
            import test_convert as C

            out = {}
            for arch in ("llama", "qwen2"):
                out.update({f"{arch}_{k}": round(v, 4) for k, v in C.qat_figures(arch, d / arch, seed).items()})
            return out
    raise SystemExit(f"unknown kind {kind}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--only", default="align,pretrain,qat")
    ap.add_argument("--cpu-capability", default="native",
                    help="comma-separated ATEN_CPU_CAPABILITY values (native = unset; e.g. native,avx2,default)")
    ap.add_argument("--sft", default="{}", help='JSON train.* overrides for SFT, e.g. \'{"max_steps": 300}\'')
    ap.add_argument("--dpo", default="{}", help="JSON train.* overrides for DPO")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        print("RESULT " + json.dumps(worker(a.worker, a.seed)), flush=True)
        return 0
    rows = {}
    for kind in a.only.split(","):
        for cap, seed, th in itertools.product(a.cpu_capability.split(","), map(int, a.seeds.split(",")),
                                               map(int, a.threads.split(","))):
            env = dict(os.environ, OMP_NUM_THREADS=str(th), WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false",
                       HF_HUB_OFFLINE="1", TRITON_INTERPRET="1", MARGINS_SFT=a.sft, MARGINS_DPO=a.dpo)
            env.pop("ATEN_CPU_CAPABILITY", None)
            if cap != "native":
                env["ATEN_CPU_CAPABILITY"] = cap
            p = subprocess.run([sys.executable, __file__, "--worker", kind, "--seed", str(seed)], env=env,
                               capture_output=True, text=True, cwd=REPO)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{kind} seed {seed} threads {th} cpu {cap} failed")
            r = json.loads(line[0][7:])
            print(json.dumps({"kind": kind, "seed": seed, "threads": th, "cpu": cap, **r}), flush=True)
            rows.setdefault(kind, []).append(r)
    print("\nfigure                      min       max   (over CPU capabilities x seeds x threads)")
    for kind, rs in rows.items():
        for k in rs[0]:
            vs = [r[k] for r in rs]
            print(f"{kind + '.' + k:26s} {min(vs):8.4f}  {max(vs):8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
