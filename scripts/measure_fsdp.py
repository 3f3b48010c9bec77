"""FSDP2 on the CPU against one process, at several seeds: the figures behind tests/test_fsdp.py's
tolerances, and the bytes a sharded checkpoint puts on each rank.

    python scripts/measure_fsdp.py [--seeds 0 1 2]

For each seed: one process with batch 2B; ``accelerate launch --use_fsdp --fsdp_version 2`` with two
processes and batch B (tests/test_fsdp.py's worker: a straight run, and a run stopped at step 2 and
resumed); B's step-2 sharded checkpoint resumed in one process. Prints the worst relative difference
of loss, val_loss and grad_norm against one process, the final models' largest logit difference, and
(first seed) the sizes of the sharded and the one-process checkpoint files.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
from conftest import SHAKESPEARE  # noqa: E402
from test_fsdp import B, COMMON, _launch  # noqa: E402
from test_pretrain import read_metrics, write_recipe  # noqa: E402

from bitnet_train.checkpoint.format import load_checkpoint  # noqa: E402
from bitnet_train.training.pretrain import load_pretrain_recipe, pretrain  # noqa: E402


def rel(a, b):
    return abs(a - b) / max(abs(a), 1e-12)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    for seed in args.seeds:
        measure(seed, sizes=seed == args.seeds[0])
    return 0


def measure(seed: int, sizes: bool) -> None:
    tmp = Path(tempfile.mkdtemp())
    p = write_recipe(tmp, SHAKESPEARE)
    sets = COMMON + [f"seed={seed}"]
    pretrain(load_pretrain_recipe(p, sets + [f"output_dir={tmp}/one", f"train.batch_size={2 * B}"]), progress=False)
    _launch(tmp, p, tmp / "fsdp", sets + [f"train.batch_size={B}"])
    ck = tmp / "fsdp" / "b" / "checkpoints" / "step-000002"
    c = tmp / "c"
    shutil.copytree(ck, c / "checkpoints" / ck.name)
    shutil.copy(tmp / "fsdp" / "b" / "metrics.jsonl", c / "metrics.jsonl")
    pretrain(load_pretrain_recipe(p, sets + [f"output_dir={c}", f"train.batch_size={2 * B}"]), resume=True, progress=False)
    m1, ma, mc = read_metrics(tmp / "one"), read_metrics(tmp / "fsdp" / "a"), read_metrics(c)
    for name, other, steps in (("fsdp", ma, {0, 1, 2, 3, 4}), ("reshard", mc, {3, 4})):
        worst = {}
        for r1, r2 in zip([r for r in m1 if r["step"] in steps], [r for r in other if r["step"] in steps]):
            for k in ("loss", "val_loss", "grad_norm"):
                if k in r1:
                    worst[k] = max(worst.get(k, 0), rel(r1[k], r2[k]))
        print(seed, name, {k: f"{v:.1e}" for k, v in worst.items()})
    x = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lo = load_checkpoint(tmp / "fsdp" / "a" / "final").eval()(input_ids=x).logits
        l1 = load_checkpoint(tmp / "one" / "final").eval()(input_ids=x).logits
    print(seed, "final logits max abs diff", f"{(lo - l1).abs().max().item():.1e}")
    if sizes:
        print("bytes: dcp", {f.name: f.stat().st_size for f in (ck / "dcp").iterdir()})
        ck1 = tmp / "one" / "checkpoints" / "step-000002"
        print("bytes: one-process", {f.name: f.stat().st_size for f in ck1.iterdir() if f.suffix in (".safetensors", ".pt")})
    shutil.rmtree(tmp)


if __name__ == "__main__":
    sys.exit(main())
