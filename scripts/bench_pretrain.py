#!/usr/bin/env python3
"""Pretraining benchmarks on the CPU, BitNet (ternary) against the same model with ``quant: none``.

1. Throughput: training steps (forward, loss, backward, clipping, AdamW) of the ``tiny`` and
   ``125m`` presets, BitNet and full precision built from the same preset and seed, timed
   alternately in this process after warm-up steps; tokens/s and the ratio BitNet / fp
   (goal: >= 0.8x).
2. Quality: ``recipes/tiny.yaml`` trained on tinyshakespeare twice through ``pretrain()``, with
   ``quant: bitnet`` and ``quant: none`` (same data, tokens, schedule); validation loss of both
   and the gap. ``--quality-model micro`` (the default; a 2-layer, hidden-128 model) keeps this
   to minutes on a shared 2-core machine; ``--quality-model tiny`` uses the recipe's own preset.
   ``--fp-lrs 1e-3,6e-3`` adds fp runs at other peak learning rates (the recipe's is chosen for
   the ternary model), and the gap to the best of them.

    python scripts/bench_pretrain.py                      # both parts
    python scripts/bench_pretrain.py --skip-quality --speed-steps 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the full 1.1 MB corpus beside the repository when there, else the 300 KB excerpt the tests use
SHAKESPEARE = next(p for p in (REPO.parent / "shared" / "data" / "tinyshakespeare.txt",
                              REPO / "tests" / "data" / "tinyshakespeare.txt") if p.is_file() or "tests" in p.parts)


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


def throughput(preset: str, batch: int, seq_len: int, steps: int, warmup: int) -> dict:
    import torch

    from bitnet_train.model import build_model
    from bitnet_train.train import _param_groups

    fns, n_params = {}, None
    for quant in ("bitnet", "none"):
        model = build_model(preset, quant=quant, seed=0).to(torch.float32).train()
        n_params = sum(p.numel() for p in model.parameters())
        vocab = model.config.vocab_size
        opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
        fns[quant] = _step_fn(model, opt, batch, seq_len, vocab, seed=1)
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {q: [] for q in fns}
    for _ in range(steps):  # alternate, so that load from other processes hits both alike
        for q, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[q].append(time.perf_counter() - t0)
    tokens = batch * seq_len
    med = {q: statistics.median(v) for q, v in times.items()}
    return {"preset": preset, "params": n_params, "tokens_per_step": tokens,
            "bitnet_tok_s": tokens / med["bitnet"], "fp_tok_s": tokens / med["none"],
            "ratio": med["none"] / med["bitnet"], "steps": steps}


MICRO = """\
description: micro model for the CPU quality benchmark (2B4T block)
hidden_size: 128
intermediate_size: 352
num_hidden_layers: 2
num_attention_heads: 4
num_key_value_heads: 2
hidden_act: relu2
max_position_embeddings: 512
rope_theta: 10000.0
tie_word_embeddings: true
"""


def quality(steps: int, data: Path, model: str, batch: int, seq: int, fp_lrs=()) -> dict:
    """Validation loss of BitNet and ``quant: none`` on the recipe's schedule; ``fp_lrs``: more fp
    runs at these peak learning rates (min_lr = lr / 10), so the baseline is not held to BitNet's LR."""
    from bitnet_train.train import load_pretrain_recipe, pretrain

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        if model == "micro":
            model = f"{tmp}/micro.yaml"
            Path(model).write_text(MICRO)
        runs = [("bitnet", "bitnet", []), ("none", "none", [])]
        runs += [(f"none@{lr:g}", "none", [f"train.lr={lr}", f"train.min_lr={lr / 10}"]) for lr in fp_lrs]
        for name, quant, extra in runs:
            r = load_pretrain_recipe(REPO / "recipes" / "tiny.yaml", [
                f"output_dir={tmp}/{name}", f"quant={quant}", f"data.path={data}", f"model={model}",
                f"train.max_steps={steps}", f"train.save_every={steps}", f"train.eval_every={steps}",
                f"train.warmup_steps={max(1, steps // 10)}", f"train.batch_size={batch}", f"data.seq_len={seq}",
                *extra])
            t0 = time.perf_counter()
            s = pretrain(r, progress=False)
            res[name] = {"val_loss": s["val_loss"], "first_val_loss": s["first_val_loss"], "tokens": s["tokens"],
                         "seconds": time.perf_counter() - t0, "lr": r.train.lr}
    return res


def run_quality(args) -> None:
    fp_lrs = [float(x) for x in args.fp_lrs.split(",") if x]
    q = quality(args.quality_steps, args.data, args.quality_model, args.quality_batch, args.quality_seq, fp_lrs)
    b = q["bitnet"]
    print(f"\nquality: recipes/tiny.yaml with model {args.quality_model} on {args.data.name}, "
          f"batch {args.quality_batch} x {args.quality_seq} tokens, {args.quality_steps} steps, {b['tokens']:,} tokens")
    print("| quant | peak lr | val loss at step 0 | val loss at the end | wall s |")
    print("|---|---|---|---|---|")
    for name, v in q.items():
        label = "bitnet" if name == "bitnet" else "none (fp)"
        print(f"| {label} | {v['lr']:g} | {v['first_val_loss']:.4f} | {v['val_loss']:.4f} | {v['seconds']:.0f} |")
    f = q["none"]
    print(f"gap (BitNet - fp, same schedule): {b['val_loss'] - f['val_loss']:+.4f} nats/token")
    if fp_lrs:
        best = min((v for k, v in q.items() if k != "bitnet"), key=lambda v: v["val_loss"])
        print(f"gap (BitNet - best fp, lr {best['lr']:g}): {b['val_loss'] - best['val_loss']:+.4f} nats/token")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed-steps", type=int, default=5, help="timed steps per model (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    ap.add_argument("--quality-steps", type=int, default=200, help="optimizer steps of each tinyshakespeare run")
    ap.add_argument("--quality-batch", type=int, default=16, help="sequences per step of the quality runs")
    ap.add_argument("--quality-seq", type=int, default=128, help="tokens per sequence of the quality runs")
    ap.add_argument("--quality-model", default="micro", help="micro (built in) or a preset name/YAML")
    ap.add_argument("--speed-models", default="tiny:16x128,125m:1x256",
                    help="preset:BATCHxSEQ,... timed for throughput")
    ap.add_argument("--data", type=Path, default=SHAKESPEARE, help="text for the quality runs")
    ap.add_argument("--fp-lrs", default="", help="more fp quality runs at these peak LRs, comma-separated")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    import os

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    if not args.skip_quality:
        run_quality(args)
    if not args.skip_speed:
        print("\n| model | parameters (BitNet) | tokens/step | BitNet tok/s | fp tok/s | BitNet / fp |")
        print("|---|---|---|---|---|---|")
        for item in args.speed_models.split(","):
            preset, shape = item.split(":")
            batch, seq = map(int, shape.split("x"))
            r = throughput(preset, batch, seq, args.speed_steps, args.warmup)
            print(f"| {preset} | {r['params'] / 1e6:.1f}M | {r['tokens_per_step']} | {r['bitnet_tok_s']:,.0f} | "
                  f"{r['fp_tok_s']:,.0f} | {r['ratio']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
