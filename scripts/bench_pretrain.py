#!/usr/bin/env python3
"""Pretraining benchmarks, BitNet (ternary) against the same model with ``quant: none``: quality on the
CPU, and real ``pretrain()`` runs timed (a GPU's, or the CPU's). The speed of one training step on the
CPU, BitNet against full precision: ``scripts/bench_memory.py`` (``--in-process`` for the ratio).

1. Quality: ``recipes/tiny.yaml`` trained on tinyshakespeare twice through ``pretrain()``, with
   ``quant: bitnet`` and ``quant: none`` (same data, tokens, schedule); validation loss of both
   and the gap. ``--quality-model micro`` (the default; a 2-layer, hidden-128 model) keeps this
   to minutes on a shared 2-core machine; ``--quality-model tiny`` uses the recipe's own preset.
   ``--fp-lrs 1e-3,6e-3`` adds fp runs at other peak learning rates (the recipe's is chosen for
   the ternary model), and the gap to the best of them.
2. ``--timed-pretrain SECONDS`` (instead of 1; for a GPU, also runs on the CPU): real
   ``pretrain()`` runs of ``recipes/125m.yaml`` (``--tp-preset``, ``--tp-batch`` x ``--tp-seq``,
   ``grad_accum`` 1, no validation), ``quant: bitnet`` then ``quant: none``, each stopped after
   SECONDS of training as a SIGINT stops it (a checkpoint is saved, the run returns). The data is
   ``--tp-data`` tokenized once by ``bitnet-train tokenize`` with ``--tp-tokenizer`` (the token
   shards, so the data path is not what is timed). Per run: the median of the per-step
   ``tokens_per_s`` of ``metrics.jsonl`` after ``--tp-skip`` warm-up steps, the model FLOPs
   utilisation (``6 * matmul parameters + 12 * layers * hidden * seq_len`` FLOPs per token, the
   tied head counted as a matmul, over the GPU's dense bf16 peak from kernels/bitnet_kernels/bench.py's table)
   and, on CUDA, the peak allocated and reserved memory (``torch.cuda.max_memory_*``). With CUDA
   the recipe's ``mixed_precision: auto`` is bf16 autocast; on the CPU fp32.

    python scripts/bench_pretrain.py                      # part 1
    python scripts/bench_pretrain.py --timed-pretrain 35 --tp-json pretrain.json
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
    from bitnet_train.training.pretrain import load_pretrain_recipe, pretrain

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


def _flops_per_token(model_dir: Path, seq_len: int) -> tuple[float, int, int]:
    """(FLOPs per trained token, matmul parameters, all parameters) of the model saved in
    ``model_dir``: 6 x the weights of every ``nn.Linear`` (BitLinear included; the tied head is a
    Linear sharing the embedding) + 12 x layers x hidden x seq_len (attention scores and values)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    matmul = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    total = sum(p.numel() for p in m.parameters())
    attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
    return 6.0 * matmul + attn, matmul, total


def timed_pretrain(args) -> dict:
    """Part 3: pretrain() runs stopped after ``args.timed_pretrain`` seconds of training each."""
    import json
    import os
    import signal
    import threading

    import torch

    from bitnet_train.cli import main as cli_main
    from bitnet_train.data.shards import is_token_dir
    from bitnet_train.training.pretrain import load_pretrain_recipe, pretrain

    out = Path(args.tp_out or tempfile.mkdtemp(prefix="bench-pretrain-"))
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    data = Path(args.tp_data)
    tokens_dir = data
    if not is_token_dir(data):
        tokens_dir = out / "tokens"
        if not is_token_dir(tokens_dir):
            t0 = time.perf_counter()
            rc = cli_main(["tokenize", str(data), "--tokenizer", args.tp_tokenizer, "--out", str(tokens_dir), "--no-progress"])
            if rc:
                raise SystemExit(f"bench_pretrain: tokenizing {data} failed (exit {rc})")
            print(f"tokenized {data} with {args.tp_tokenizer} in {time.perf_counter() - t0:.1f} s", flush=True)
    from bitnet_train.kernels.bench import peaks_for

    peaks = peaks_for(name) if cuda else None
    res = {"device": name, "torch": torch.__version__, "seconds": args.timed_pretrain, "preset": args.tp_preset,
           "batch": args.tp_batch, "seq_len": args.tp_seq, "runs": {}}
    for quant in [q for q in args.tp_quants.split(",") if q]:
        run_dir = out / f"run-{quant}"
        r = load_pretrain_recipe(REPO / "recipes" / "125m.yaml", [
            f"output_dir={run_dir}", f"quant={quant}", f"model={args.tp_preset}", f"data.path={tokens_dir}",
            f"data.tokenizer={args.tp_tokenizer}", f"data.seq_len={args.tp_seq}", "data.val_tokens=0",
            f"train.batch_size={args.tp_batch}", "train.grad_accum=1", "train.max_steps=1000000",
            "train.save_every=1000000", "train.eval_every=0", "train.eval_batches=0", "train.warmup_steps=100",
            "train.keep_last=1"])
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        metrics = run_dir / "metrics.jsonl"
        done = threading.Event()

        def watch():
            # once training has begun (a step is logged), SECONDS later a SIGINT: the loop saves a
            # checkpoint and returns, as for Ctrl-C
            while not (metrics.is_file() and metrics.read_text().strip()):
                if done.wait(0.2):
                    return
            if not done.wait(args.timed_pretrain):
                os.kill(os.getpid(), signal.SIGINT)

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            s = pretrain(r, progress=False)
        finally:
            done.set()
            watcher.join()
        wall = time.perf_counter() - t0
        recs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        steps = [x for x in recs if "tokens_per_s" in x]
        timed = steps[args.tp_skip:] or steps
        tok_s = statistics.median(x["tokens_per_s"] for x in timed) if timed else None
        ck = sorted((run_dir / "checkpoints").glob("step-*"))
        fpt, matmul, total = _flops_per_token(ck[-1], args.tp_seq) if ck else (None, None, None)
        row = {"steps": s["step"], "tokens": s["tokens"], "interrupted": bool(s.get("interrupted")), "wall_s": wall,
               "tokens_per_s": tok_s, "timed_steps": len(timed), "loss_first": steps[0]["loss"] if steps else None,
               "loss_last": steps[-1]["loss"] if steps else None, "params": total, "matmul_params": matmul,
               "flops_per_token": fpt}
        row["tflops"] = tok_s * fpt / 1e12 if tok_s and fpt else None
        row["mfu"] = tok_s * fpt / peaks[2] if tok_s and fpt and peaks else None
        if cuda:
            row["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
            row["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        res["runs"][quant] = row
        print(f"{quant}: {row['steps']} steps, {row['tokens']:,} tokens in {wall:.0f} s; median {tok_s or 0:,.0f} tokens/s "
              f"over {len(timed)} steps; loss {row['loss_first']} -> {row['loss_last']}", flush=True)
        if args.tp_json:
            Path(args.tp_json).write_text(json.dumps(res, indent=1))
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # GBs at 125m; the figures are read
    print(f"\ntimed pretraining on {name}: preset {args.tp_preset}, {args.tp_batch} x {args.tp_seq} tokens per step, "
          f"{args.timed_pretrain:g} s of training per run, torch {torch.__version__}"
          + (f"; MFU against {peaks[2] / 1e12:.0f} TFLOP/s dense bf16 (datasheet)" if peaks else ""))
    print("| quant | parameters | steps | median tokens/s | model TFLOP/s | MFU | peak allocated MiB | peak reserved MiB |")
    print("|---|---|---|---|---|---|---|---|")
    f = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    for quant, row in res["runs"].items():
        print(f"| {quant} | {f(row['params'] and row['params'] / 1e6, '.1f')}M | {row['steps']} | {f(row['tokens_per_s'], ',.0f')} | "
              f"{f(row['tflops'], '.1f')} | {'n/a' if row['mfu'] is None else format(100 * row['mfu'], '.1f') + '%'} | "
              f"{f(row.get('peak_allocated_mib'), ',.0f')} | {f(row.get('peak_reserved_mib'), ',.0f')} |")
    runs = res["runs"]
    if "bitnet" in runs and "none" in runs and runs["bitnet"]["tokens_per_s"] and runs["none"]["tokens_per_s"]:
        ratio = runs["bitnet"]["tokens_per_s"] / runs["none"]["tokens_per_s"]
        res["bitnet_over_none"] = ratio
        print(f"BitNet / none tokens/s: {ratio:.2f}x (goal >= 0.9x on a GPU)")
        if args.tp_json:
            Path(args.tp_json).write_text(json.dumps(res, indent=1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quality-steps", type=int, default=200, help="optimizer steps of each tinyshakespeare run")
    ap.add_argument("--quality-batch", type=int, default=16, help="sequences per step of the quality runs")
    ap.add_argument("--quality-seq", type=int, default=128, help="tokens per sequence of the quality runs")
    ap.add_argument("--quality-model", default="micro", help="micro (built in) or a preset name/YAML")
    ap.add_argument("--data", type=Path, default=SHAKESPEARE, help="text for the quality runs")
    ap.add_argument("--fp-lrs", default="", help="more fp quality runs at these peak LRs, comma-separated")
    ap.add_argument("--timed-pretrain", type=float, default=None, metavar="SECONDS",
                    help="part 2 only: pretrain() runs of SECONDS of training each (bitnet, then none)")
    ap.add_argument("--tp-preset", default="125m", help="part 2: model preset (default 125m)")
    ap.add_argument("--tp-data", default=str(REPO / "tests" / "data" / "tinyshakespeare.txt"),
                    help="part 2: text to tokenize, or a directory bitnet-train tokenize wrote (default: the tests' excerpt)")
    ap.add_argument("--tp-tokenizer", default="bpe:32000", help="part 2: tokenizer spec (default bpe:32000)")
    ap.add_argument("--tp-batch", type=int, default=16, help="part 2: sequences per step (default 16)")
    ap.add_argument("--tp-seq", type=int, default=1024, help="part 2: tokens per sequence (default 1024)")
    ap.add_argument("--tp-quants", default="bitnet,none", help="part 2: quant values to run, in order")
    ap.add_argument("--tp-skip", type=int, default=5, help="part 2: warm-up steps left out of the median (default 5)")
    ap.add_argument("--tp-out", default=None, help="part 2: where the runs and the token shards go (default: a temp dir)")
    ap.add_argument("--tp-json", default=None, help="part 2: write the figures to this JSON file")
    args = ap.parse_args()
    if args.timed_pretrain is not None:
        if args.timed_pretrain <= 0:
            raise SystemExit("bench_pretrain: --timed-pretrain must be positive")
        from bench_harness import machine_line

        print(machine_line(), flush=True)
        timed_pretrain(args)
        return
    import os

    from bench_harness import machine_line

    print(f"{machine_line()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    run_quality(args)


if __name__ == "__main__":
    main()
