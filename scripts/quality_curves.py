#!/usr/bin/env python3
"""Quality at CPU scale: BitNet (``quant: bitnet``) against full precision (``quant: none``) on the same
recipe and tokens at two model sizes, scored on held-out English in bits per byte during training.

Recipe: ``recipes/tiny.yaml`` (its learning rate, schedule, batch 16 x 128 tokens, BPE 2,048) with
``data.path`` = the training part of tinyshakespeare and ``train.max_steps`` / ``train.save_every`` set
here. Sizes: ``tiny`` (the preset: 4 layers, hidden 256, FFN 704) and ``tiny4x`` (the same block at
hidden 512, FFN 1408, 8 heads / 4 KV heads: 4.0x the non-embedding parameters). Data: the 1.1 MB
tinyshakespeare beside the repository (``../shared/data/``) when present, else the 300 KB excerpt in
``tests/data``; its last ``--held-out`` characters are never trained on (nor seen by the tokenizer) and
every saved checkpoint is scored on them with :func:`bitnet_train.evaluate.evaluate` (what ``bitnet-train
eval CKPT --data held_out.txt`` prints: packed windows of the training ``seq_len``, bits per UTF-8 byte).

One configuration per command, each result a JSON file in ``--results`` (default ``docs/quality/``), so
the runs can be made one at a time and then plotted::

    python scripts/quality_curves.py run --only tiny/bitnet --steps 15 --trial   # throughput, nothing kept
    python scripts/quality_curves.py run --only tiny/bitnet --steps 240 --points 8
    python scripts/quality_curves.py run --only tiny/none   --steps 240 --points 8
    python scripts/quality_curves.py run --only tiny4x/bitnet --steps 240 --points 8
    python scripts/quality_curves.py run --only tiny4x/none   --steps 240 --points 8
    python scripts/quality_curves.py plot     # -> docs/quality.png and docs/quality.md

A configuration whose JSON exists is not run again (``--rerun`` to replace it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = next(p for p in (REPO.parent / "shared" / "data" / "tinyshakespeare.txt",
                               REPO / "tests" / "data" / "tinyshakespeare.txt") if p.is_file() or "tests" in p.parts)
RESULTS = REPO / "docs" / "quality"
RECIPE = REPO / "recipes" / "tiny.yaml"
QUANTS = ("bitnet", "none")
# size -> preset YAML overrides of configs/tiny.yaml (None: the preset itself)
SIZES = {
    "tiny": None,
    "tiny4x": {"hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8, "num_key_value_heads": 4},
}
# BitNet b1.58 ("The Era of 1-bit LLMs", Table 1): size -> (BitNet b1.58 ppl, LLaMA ppl)
PAPER = {"700M": (12.87, 12.33), "1.3B": (11.29, 11.25), "3B": (9.91, 10.04)}


def model_spec(size: str, tmp: Path) -> str:
    """The recipe's ``model:`` value for ``size``: a preset name, or a preset YAML written to ``tmp``."""
    over = SIZES[size]
    if over is None:
        return size
    import yaml

    base = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    base.update(over, description=f"{size}: configs/tiny.yaml with {over}")
    f = tmp / f"{size}.yaml"
    f.write_text(yaml.safe_dump(base, sort_keys=False))
    return str(f)


def split_text(data: Path, held_out: int, tmp: Path) -> tuple[Path, Path]:
    text = data.read_text(encoding="utf-8")
    if held_out >= len(text) // 2:
        raise SystemExit(f"--held-out {held_out}: {data} has only {len(text):,} characters")
    cut = text.rfind("\n\n", 0, len(text) - held_out) + 2  # at a paragraph boundary
    train, held = tmp / "train.txt", tmp / "held_out.txt"
    train.write_text(text[:cut], encoding="utf-8")
    held.write_text(text[cut:], encoding="utf-8")
    return train, held


def count_params(ckpt: Path) -> tuple[int, int]:
    """(all parameters, those outside the token embedding; the head is tied) of a checkpoint."""
    from bitnet_train.model import load_model

    model = load_model(ckpt, backend="torch")
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    return total, total - emb


def run_one(size: str, quant: str, args) -> dict:
    import torch

    from bitnet_train.evaluate import evaluate
    from bitnet_train.train import load_pretrain_recipe, pretrain

    torch.set_num_threads(args.threads)
    if args.points < 1 or args.steps % args.points:
        raise SystemExit(f"--steps {args.steps} must be a multiple of --points {args.points} (the last step is scored)")
    every = args.steps // args.points
    with tempfile.TemporaryDirectory(prefix="quality-") as d:
        tmp = Path(d)
        train, held = split_text(args.data, args.held_out, tmp)
        recipe = load_pretrain_recipe(RECIPE, [
            f"output_dir={tmp / 'run'}", f"model={model_spec(size, tmp)}", f"quant={quant}", f"seed={args.seed}",
            f"data.path={train}", f"train.max_steps={args.steps}", f"train.save_every={every}",
            f"train.keep_last={args.points + 1}", "train.eval_every=0", "train.eval_batches=2",
            f"train.warmup_steps={min(20, max(1, args.steps // 10))}", "wandb.enabled=false"])
        t0 = time.perf_counter()
        summary = pretrain(recipe, progress=not args.no_progress)
        train_s = time.perf_counter() - t0
        tokens_per_step = recipe.train.batch_size * recipe.train.grad_accum * recipe.data.seq_len
        out = {"size": size, "quant": quant, "seed": args.seed, "data": str(args.data.relative_to(REPO.parent)
               if args.data.is_relative_to(REPO.parent) else args.data), "held_out_chars": len(held.read_text()),
               "train_chars": len(train.read_text()), "steps": args.steps, "tokens": summary["tokens"],
               "tokens_per_step": tokens_per_step, "train_seconds": train_s,
               "train_tokens_per_s": summary["tokens"] / train_s, "lr": recipe.train.lr,
               "model_overrides": SIZES[size], "threads": args.threads, "points": []}
        ckpts = sorted((tmp / "run" / "checkpoints").glob("step-*"))
        if args.trial:
            ckpts = ckpts[-1:]
        t1 = time.perf_counter()
        for ck in ckpts:
            step = int(ck.name.split("-")[1])
            r = evaluate(str(ck), str(held), seq_len=recipe.data.seq_len, progress=False)
            out["points"].append({"step": step, "tokens": step * tokens_per_step, "bits_per_byte": r["bits_per_byte"],
                                  "loss": r["loss"], "perplexity": r["perplexity"], "eval_tokens": r["tokens"],
                                  "eval_bytes": r["bytes"], "seq_len": r["seq_len"]})
            print(f"{size}/{quant} step {step}: held-out {r['bits_per_byte']:.4f} bits/byte, loss {r['loss']:.4f}",
                  flush=True)
        out["eval_seconds"] = time.perf_counter() - t1
        out["params"], out["non_embedding_params"] = count_params(tmp / "run" / "final")
    print(f"{size}/{quant}: {out['params']:,} parameters ({out['non_embedding_params']:,} outside the embedding), "
          f"{out['tokens']:,} tokens in {train_s:.0f} s ({out['train_tokens_per_s']:,.0f} tokens/s), "
          f"evaluation {out['eval_seconds']:.0f} s", flush=True)
    return out


def cmd_run(args) -> int:
    for item in args.only.split(","):
        size, _, quant = item.strip().partition("/")
        if size not in SIZES or quant not in QUANTS:
            raise SystemExit(f"--only {item!r}: give SIZE/QUANT with SIZE in {', '.join(SIZES)} and QUANT in "
                             f"{', '.join(QUANTS)}")
        f = args.results / f"{size}-{quant}.json"
        if f.exists() and not args.rerun and not args.trial:
            print(f"{f}: exists, not run again (--rerun to replace it)")
            continue
        res = run_one(size, quant, args)
        if args.trial:
            continue
        from bitnet_train.fsutil import atomic_path

        args.results.mkdir(parents=True, exist_ok=True)
        with atomic_path(f) as tmp:
            tmp.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {f}")
    return 0


def load_results(results: Path) -> dict:
    runs = {}
    for size in SIZES:
        for quant in QUANTS:
            f = results / f"{size}-{quant}.json"
            if f.exists():
                runs[size, quant] = json.loads(f.read_text())
    if not runs:
        raise SystemExit(f"{results}: no results (run `quality_curves.py run --only SIZE/QUANT` first)")
    return runs


def table(runs: dict) -> str:
    """The markdown table of final figures, the gaps, and the paper's anchor."""
    lines = ["| size | parameters (non-embedding) | tokens | quant | held-out bits per byte | perplexity per token |",
             "|---|---|---|---|---|---|"]
    gaps = []
    for size in SIZES:
        for quant in QUANTS:
            r = runs.get((size, quant))
            if r is None:
                continue
            p = r["points"][-1]
            label = "BitNet b1.58" if quant == "bitnet" else "full precision"
            lines.append(f"| {size} | {r['params'] / 1e6:.2f}M ({r['non_embedding_params'] / 1e6:.2f}M) | "
                         f"{p['tokens']:,} | {label} | {p['bits_per_byte']:.4f} | {p['perplexity']:.2f} |")
        if (size, "bitnet") in runs and (size, "none") in runs:
            b, f = runs[size, "bitnet"]["points"][-1], runs[size, "none"]["points"][-1]
            gaps.append((size, b, f))
    out = "\n".join(lines) + "\n"
    if gaps:
        out += ("\n| size | gap in bits per byte (BitNet - fp) | relative | perplexity ratio BitNet / fp |\n"
                "|---|---|---|---|\n")
        for size, b, f in gaps:
            d = b["bits_per_byte"] - f["bits_per_byte"]
            out += (f"| {size} | {d:+.4f} | {d / f['bits_per_byte']:+.2%} | "
                    f"{b['perplexity'] / f['perplexity']:.3f} |\n")
        out += ("| paper 700M / 1.3B / 3B | | | " + " / ".join(f"{b / f:.3f}" for b, f in PAPER.values())
                + " (" + ", ".join(f"{k}: {b} vs {f}" for k, (b, f) in PAPER.items()) + ") |\n")
    return out


def cmd_plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bitnet_train.fsutil import atomic_path

    runs = load_results(args.results)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = dict(zip(SIZES, ("tab:blue", "tab:red", "tab:green")))
    for (size, quant), r in sorted(runs.items()):
        x = [p["tokens"] for p in r["points"]]
        y = [p["bits_per_byte"] for p in r["points"]]
        label = f"{size} ({r['params'] / 1e6:.1f}M), {'BitNet b1.58' if quant == 'bitnet' else 'full precision'}"
        ax.plot(x, y, marker="o", ms=3, color=colors[size], ls="-" if quant == "bitnet" else "--", label=label)
    any_run = next(iter(runs.values()))
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(f"tinyshakespeare, last {any_run['held_out_chars']:,} characters held out", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(args.png) as tmp:
        fig.savefig(tmp, format="png")
    print(f"wrote {args.png}")
    with atomic_path(args.table) as tmp:
        tmp.write_text(page(runs, args.png.relative_to(args.table.parent) if args.png.is_relative_to(args.table.parent)
                            else args.png))
    print(f"wrote {args.table}\n\n" + table(runs))
    return 0


def page(runs: dict, png) -> str:
    """docs/quality.md: what was run, the picture and the tables (written by ``plot``; edit this script)."""
    r = next(iter(runs.values()))
    sizes = ", ".join(f"`{s}` ({'the preset' if o is None else 'tiny with ' + ', '.join(f'{k} {v}' for k, v in o.items())})"
                      for s, o in SIZES.items())
    cmds = "\n".join(f"python scripts/quality_curves.py run --only {s}/{q} --steps {runs[s, q]['steps']} "
                      f"--points {len(runs[s, q]['points'])}" for s, q in runs) + "\npython scripts/quality_curves.py plot"
    return f"""# Quality at CPU scale: BitNet b1.58 vs full precision

<!-- written by `python scripts/quality_curves.py plot` from docs/quality/*.json; edit the script, not this page -->

`recipes/tiny.yaml` (peak LR {r['lr']:g}, cosine, batch 16 x 128 tokens, BPE 2,048 trained on the training
text) with `quant: bitnet` and `quant: none`, seed {r['seed']}, the same tokens in the same order, at two
sizes: {sizes}. Data: `{r['data']}`, its first {r['train_chars']:,} characters for training (5% of their
blocks go to the loop's own validation) and its last {r['held_out_chars']:,} characters held out: never trained
on, not seen by the tokenizer. Every {r['steps'] // len(r['points'])} steps a checkpoint is scored on the
held-out text with `bitnet_train.evaluate.evaluate` (as `bitnet-train eval CKPT --data held_out.txt`: packed
windows of 128 tokens, bits per UTF-8 byte; {r['points'][0]['eval_tokens']:,} tokens). CPU, {r['threads']}
torch threads. Interpretation: [eval.md](eval.md#quality-curves-bitnet-vs-full-precision).

```bash
{cmds}
```

![held-out bits per byte vs training tokens]({png})

{table(runs)}
Wall time of each run (training, then scoring): """ + "; ".join(
        f"{s}/{q} {v['train_seconds']:.0f} s + {v['eval_seconds']:.0f} s ({v['train_tokens_per_s']:,.0f} tokens/s)"
        for (s, q), v in runs.items()) + ".\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and score configurations (one JSON each in --results)")
    r.add_argument("--only", required=True, help="SIZE/QUANT[,SIZE/QUANT...], e.g. tiny/bitnet")
    r.add_argument("--steps", type=int, default=240, help="optimizer steps (batch 16 x 128 tokens each)")
    r.add_argument("--points", type=int, default=8, help="checkpoints scored along the run")
    r.add_argument("--held-out", type=int, default=60_000, help="characters at the end of the text held out")
    r.add_argument("--data", type=Path, default=SHAKESPEARE, help="the text (default: tinyshakespeare)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=2, help="torch threads")
    r.add_argument("--trial", action="store_true", help="time the run, score only its last checkpoint, keep nothing")
    r.add_argument("--rerun", action="store_true", help="replace an existing result")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--results", type=Path, default=RESULTS)
    r.set_defaults(func=cmd_run)
    p = sub.add_parser("plot", help="the PNG and the markdown table from the results")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--png", type=Path, default=REPO / "docs" / "quality.png")
    p.add_argument("--table", type=Path, default=REPO / "docs" / "quality.md")
    p.set_defaults(func=cmd_plot)
    args = ap.parse_args(argv)
    if getattr(args, "data", None) is not None:
        args.data = args.data.resolve()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
