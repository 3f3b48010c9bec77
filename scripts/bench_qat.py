#!/usr/bin/env python
"""The QAT figures of docs/performance.md: a tiny Llama trained in full precision, then turned ternary.

1. a tiny Llama (transformers' LlamaForCausalLM, built here, with a byte-level BPE trained on the
   data) is trained in full precision with our loop (``model: hf:<dir>``, ``quant: none``);
2. from that model, with the same number of tokens each (recipes/qat-tiny.yaml + overrides):
   - full precision, continued (the reference: what the tokens are worth without quantization),
   - QAT without warm-up (converted on load, quant_lambda 1 from the first step),
   - QAT with the linear warm-up, and with the sigmoid warm-up;
   "naive conversion" is the step-0 validation loss of the QAT runs (converted, not trained).

Every run evaluates on the same held-out blocks (same data, tokenizer, seq_len and seed).
Prints a Markdown table and writes OUT/results.json.

    python scripts/bench_qat.py [--out runs/bench-qat] [--fp-steps 400] [--qat-steps 200] [--warmup 100]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-qat")
    ap.add_argument("--data", default=str(next(p for p in (REPO.parent / "shared" / "data" / "tinyshakespeare.txt",
                                                       REPO / "tests" / "data" / "tinyshakespeare.txt") if p.is_file() or "tests" in p.parts)))
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "qat-tiny.yaml"))
    ap.add_argument("--fp-steps", type=int, default=400)
    ap.add_argument("--fp-lr", type=float, default=3e-3)
    ap.add_argument("--qat-steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=100, help="quant_warmup.steps of the warm-up runs")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for these sizes)")
    args = ap.parse_args()
    from bench_harness import machine_line

    print(machine_line(), flush=True)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitnet_train.data.tokenizer import train_bpe
    from bitnet_train.training.pretrain import load_pretrain_recipe, pretrain

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = Path(args.data).read_text()
    tok = train_bpe([text[i : i + 4096] for i in range(0, len(text), 4096)], vocab_size=args.vocab)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(args.seed)
    init = out / "init"
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(init)
    tok.save_pretrained(init)
    n_params = sum(p.numel() for p in model.parameters())

    def run(name, model_spec, quant, steps, warmup=0, shape="linear", lr=None):
        sets = [f"output_dir={out / name}", f"model={model_spec}", f"quant={quant}", f"seed={args.seed}",
                f"data.path={args.data}", f"train.max_steps={steps}", f"train.save_every={steps}",
                f"train.eval_every={steps}", f"quant_warmup.steps={warmup}", f"quant_warmup.shape={shape}"]
        if lr is not None:
            sets += [f"train.lr={lr}", f"train.min_lr={lr / 10}"]
        t0 = time.perf_counter()
        s = pretrain(load_pretrain_recipe(args.recipe, sets), progress=False)
        s["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {json.dumps(s)}", file=sys.stderr)
        return s

    fp = run("fp", f"hf:{init}", "none", args.fp_steps, lr=args.fp_lr)
    base = f"hf:{fp['final']}"
    runs = {
        "fp-continued": run("fp-continued", base, "none", args.qat_steps),
        "qat-no-warmup": run("qat-no-warmup", base, "bitnet", args.qat_steps, warmup=0),
        "qat-warmup-linear": run("qat-warmup-linear", base, "bitnet", args.qat_steps, warmup=args.warmup),
        "qat-warmup-sigmoid": run("qat-warmup-sigmoid", base, "bitnet", args.qat_steps, warmup=args.warmup, shape="sigmoid"),
    }
    naive = runs["qat-no-warmup"]["first_val_loss"]
    assert abs(naive - runs["qat-warmup-linear"]["first_val_loss"]) < 1e-6  # same model, same held-out blocks
    tokens = runs["qat-no-warmup"]["tokens"]
    rows = [
        ("full precision (our loop, %d steps, %s tokens)" % (fp["step"], f"{fp['tokens']:,}"), fp["val_loss"]),
        ("naive conversion (no warm-up, no fine-tuning)", naive),
        (f"full precision, continued {tokens:,} tokens", runs["fp-continued"]["val_loss"]),
        (f"QAT without warm-up, {tokens:,} tokens", runs["qat-no-warmup"]["val_loss"]),
        (f"QAT, linear warm-up over {args.warmup} steps, {tokens:,} tokens", runs["qat-warmup-linear"]["val_loss"]),
        (f"QAT, sigmoid warm-up (k=8) over {args.warmup} steps, {tokens:,} tokens", runs["qat-warmup-sigmoid"]["val_loss"]),
    ]
    print(f"\ntiny Llama, {n_params:,} parameters, vocab {len(tok)}, data {Path(args.data).name}, seed {args.seed}, "
          f"torch {torch.__version__}, {platform.machine()} CPU, {args.threads} thread(s)\n")
    print("| model | validation loss | perplexity |")
    print("|---|---|---|")
    for name, v in rows:
        print(f"| {name} | {v:.4f} | {math.exp(v):.2f} |")
    res = {"args": vars(args), "params": n_params, "fp": fp, **runs, "naive_conversion_val_loss": naive,
           "table": [{"model": n, "val_loss": v} for n, v in rows]}
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
