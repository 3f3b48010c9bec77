#!/usr/bin/env python3
"""Quality at CPU scale: BitNet (``quant: bitnet``) against full precision (``quant: none``) on the same
recipe and tokens at two model sizes, scored on held-out English in bits per byte during training.

Recipe: ``recipes/tiny.yaml`` (its learning rate, schedule, batch 16 x 128 tokens, BPE 2,048) with
``data.path`` = the training part of tinyshakespeare and ``train.max_steps`` / ``train.save_every`` set
here. Sizes: ``tiny`` (the preset: 4 layers, hidden 256, FFN 704) and ``tiny4x`` (the same block at
hidden 512, FFN 1408, 8 heads / 4 KV heads: 4.0x the non-embedding parameters). Data: the 1.1 MB
tinyshakespeare beside the repository (``../shared/data/``) when present, else the 300 KB excerpt in
``tests/data``; its last ``--held-out`` characters are never trained on (nor seen by the tokenizer) and
every saved checkpoint is scored on them with :func:`bitnet_train.evaluation.evaluate.evaluate` (what ``bitnet-train
eval CKPT --data held_out.txt`` prints: packed windows of the training ``seq_len``, bits per UTF-8 byte).

One configuration per command, each result a JSON file in ``--results`` (default ``docs/quality/``), so
the runs can be made one at a time and then plotted::

    python scripts/quality_curves.py run --only tiny/bitnet --steps 15 --trial   # throughput, nothing kept
    python scripts/quality_curves.py run --only tiny/bitnet --steps 240 --points 8
    python scripts/quality_curves.py run --only tiny/none   --steps 240 --points 8
    python scripts/quality_curves.py run --only tiny4x/bitnet --steps 240 --points 8
    python scripts/quality_curves.py run --only tiny4x/none   --steps 240 --points 8
    python scripts/quality_curves.py run --only tiny/none --lr 1e-3 --steps 240 --points 8
    python scripts/quality_curves.py plot     # -> docs/quality.png and docs/quality.md

``--lr`` sets the peak LR (default: the recipe's 3e-3) and scales the recipe's ``min_lr`` in the same ratio;
each result is ``SIZE-QUANT-lrLR.json`` (``tiny-none-lr1e-3.json``). ``plot`` draws each size and quant at its
best LR among those run (the lowest final held-out bits per byte), tables every run, and computes the
BitNet - full precision gap best against best. A configuration whose JSON exists is not run again
(``--rerun`` to replace it).
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
    from bitnet_train.modeling.models import load_model

    model = load_model(ckpt, backend="torch")
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    return total, total - emb


def lr_tag(lr: float) -> str:
    """``3e-3`` for 0.003: the LR as the result file names carry it."""
    m, e = f"{lr:.6e}".split("e")
    return f"{float(m):g}e{int(e)}"


def result_file(results: Path, size: str, quant: str, lr: float) -> Path:
    return results / f"{size}-{quant}-lr{lr_tag(lr)}.json"


def recipe_lr() -> tuple[float, float]:
    """(peak LR, min LR) of ``recipes/tiny.yaml``."""
    import yaml

    train = yaml.safe_load(RECIPE.read_text())["train"]
    return float(train["lr"]), float(train["min_lr"])


def run_one(size: str, quant: str, args) -> dict:
    import torch

    from bitnet_train.evaluation.evaluate import evaluate
    from bitnet_train.training.pretrain import load_pretrain_recipe, pretrain

    torch.set_num_threads(args.threads)
    if args.points < 1 or args.steps % args.points:
        raise SystemExit(f"--steps {args.steps} must be a multiple of --points {args.points} (the last step is scored)")
    every = args.steps // args.points
    base_lr, base_min = recipe_lr()
    lr = base_lr if args.lr is None else args.lr
    min_lr = round(base_min * lr / base_lr, 12)  # the recipe's min/peak ratio
    with tempfile.TemporaryDirectory(prefix="quality-") as d:
        tmp = Path(d)
        train, held = split_text(args.data, args.held_out, tmp)
        recipe = load_pretrain_recipe(RECIPE, [
            f"output_dir={tmp / 'run'}", f"model={model_spec(size, tmp)}", f"quant={quant}", f"seed={args.seed}",
            f"data.path={train}", f"train.max_steps={args.steps}", f"train.save_every={every}",
            f"train.keep_last={args.points + 1}", "train.eval_every=0", "train.eval_batches=2",
            f"train.warmup_steps={min(20, max(1, args.steps // 10))}", f"train.lr={lr!r}", f"train.min_lr={min_lr!r}",
            "wandb.enabled=false"])
        t0 = time.perf_counter()
        summary = pretrain(recipe, progress=not args.no_progress)
        train_s = time.perf_counter() - t0
        tokens_per_step = recipe.train.batch_size * recipe.train.grad_accum * recipe.data.seq_len
        out = {"size": size, "quant": quant, "seed": args.seed, "data": str(args.data.relative_to(REPO.parent)
               if args.data.is_relative_to(REPO.parent) else args.data), "held_out_chars": len(held.read_text()),
               "train_chars": len(train.read_text()), "steps": args.steps, "tokens": summary["tokens"],
               "tokens_per_step": tokens_per_step, "train_seconds": train_s,
               "train_tokens_per_s": summary["tokens"] / train_s, "lr": recipe.train.lr,
               "min_lr": recipe.train.min_lr,
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
        f = result_file(args.results, size, quant, recipe_lr()[0] if args.lr is None else args.lr)
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
    """{(size, quant, lr): result} from every ``SIZE-QUANT-lrLR.json`` in ``results``."""
    runs = {}
    for f in sorted(results.glob("*.json")):
        try:
            r = json.loads(f.read_text())
            key = (r["size"], r["quant"], float(r["lr"]))
            r["points"][-1]["bits_per_byte"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise SystemExit(f"{f}: not a quality_curves.py result ({type(e).__name__}: {e})")
        if key[0] not in SIZES or key[1] not in QUANTS:
            raise SystemExit(f"{f}: size {key[0]!r} / quant {key[1]!r} is not one this script runs")
        if f != result_file(results, *key):
            raise SystemExit(f"{f}: holds {key[0]}/{key[1]} at lr {key[2]:g}; expected the name "
                             f"{result_file(results, *key).name}")
        runs[key] = r
    if not runs:
        raise SystemExit(f"{results}: no results (run `quality_curves.py run --only SIZE/QUANT` first)")
    return runs


def final_bpb(r: dict) -> float:
    return r["points"][-1]["bits_per_byte"]


def best_runs(runs: dict) -> dict:
    """{(size, quant): (lr, result)}: for each configuration, the LR with the lowest final held-out bits per byte."""
    best = {}
    for (size, quant, lr), r in runs.items():
        if (size, quant) not in best or final_bpb(r) < final_bpb(best[size, quant][1]):
            best[size, quant] = (lr, r)
    return best


def ordered(runs: dict) -> list:
    return sorted(runs, key=lambda k: (list(SIZES).index(k[0]), QUANTS.index(k[1]), k[2]))


def label(quant: str) -> str:
    return "BitNet b1.58" if quant == "bitnet" else "full precision"


def table(runs: dict) -> str:
    """The markdown table of every run's final figures, the best-vs-best gaps, and the paper's anchor."""
    best = best_runs(runs)
    lines = ["| size | parameters (non-embedding) | tokens | quant | peak LR | held-out bits per byte | "
             "perplexity per token |", "|---|---|---|---|---|---|---|"]
    for size, quant, lr in ordered(runs):
        r = runs[size, quant, lr]
        p = r["points"][-1]
        mark = " (best)" if sum(k[:2] == (size, quant) for k in runs) > 1 and best[size, quant][0] == lr else ""
        lines.append(f"| {size} | {r['params'] / 1e6:.2f}M ({r['non_embedding_params'] / 1e6:.2f}M) | "
                     f"{p['tokens']:,} | {label(quant)} | {lr_tag(lr)}{mark} | {p['bits_per_byte']:.4f} | "
                     f"{p['perplexity']:.2f} |")
    out = "\n".join(lines) + "\n"
    gaps = [(s, best[s, "bitnet"], best[s, "none"]) for s in SIZES if (s, "bitnet") in best and (s, "none") in best]
    if gaps:
        out += ("\nEach quant at its best peak LR among those run:\n\n"
                "| size | BitNet LR | fp LR | gap in bits per byte (BitNet - fp) | relative | "
                "perplexity ratio BitNet / fp |\n|---|---|---|---|---|---|\n")
        for size, (lb, rb), (lf, rf) in gaps:
            b, f = rb["points"][-1], rf["points"][-1]
            d = b["bits_per_byte"] - f["bits_per_byte"]
            out += (f"| {size} | {lr_tag(lb)} | {lr_tag(lf)} | {d:+.4f} | {d / f['bits_per_byte']:+.2%} | "
                    f"{b['perplexity'] / f['perplexity']:.3f} |\n")
        out += ("| paper 700M / 1.3B / 3B | | | | | " + " / ".join(f"{b / f:.3f}" for b, f in PAPER.values())
                + " (" + ", ".join(f"{k}: {b} vs {f}" for k, (b, f) in PAPER.items()) + ") |\n")
    return out


def cmd_plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bitnet_train.fsutil import atomic_path

    runs = load_results(args.results)
    best = best_runs(runs)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = dict(zip(SIZES, ("tab:blue", "tab:red", "tab:green")))
    for size, quant in sorted(best, key=lambda k: (list(SIZES).index(k[0]), QUANTS.index(k[1]))):
        lr, r = best[size, quant]
        x = [p["tokens"] for p in r["points"]]
        y = [p["bits_per_byte"] for p in r["points"]]
        tried = sorted(k[2] for k in runs if k[:2] == (size, quant))
        of = f" (best of {', '.join(map(lr_tag, tried))})" if len(tried) > 1 else " (the only LR run)"
        ax.plot(x, y, marker="o", ms=3, color=colors[size], ls="-" if quant == "bitnet" else "--",
                label=f"{size} ({r['params'] / 1e6:.1f}M), {label(quant)}, lr {lr_tag(lr)}{of}")
    any_run = next(iter(runs.values()))
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(f"tinyshakespeare, last {any_run['held_out_chars']:,} characters held out; "
                 "each quant at its best peak LR", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
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
    base_lr, base_min = recipe_lr()
    sizes = ", ".join(f"`{s}` ({'the preset' if o is None else 'tiny with ' + ', '.join(f'{k} {v}' for k, v in o.items())})"
                      for s, o in SIZES.items())
    cmds = "\n".join(f"python scripts/quality_curves.py run --only {s}/{q} "
                     + ("" if lr == base_lr else f"--lr {lr_tag(lr)} ")
                     + f"--steps {runs[s, q, lr]['steps']} --points {len(runs[s, q, lr]['points'])}"
                     for s, q, lr in ordered(runs)) + "\npython scripts/quality_curves.py plot"
    return f"""# Quality at CPU scale: BitNet b1.58 vs full precision

<!-- written by `python scripts/quality_curves.py plot` from docs/quality/*.json; edit the script, not this page -->

`recipes/tiny.yaml` (cosine schedule, batch 16 x 128 tokens, BPE 2,048 trained on the training text; its peak
LR {lr_tag(base_lr)} and min LR {lr_tag(base_min)}, or the peak LR of the table's LR column with the min LR in the
same 1/{base_lr / base_min:g} ratio) with `quant: bitnet` and `quant: none`, seed {r['seed']}, the same tokens in the same order, at two
sizes: {sizes}. Data: `{r['data']}`, its first {r['train_chars']:,} characters for training (these runs were made
when the loop's own validation took every 20th block of them; the code now holds out `data.val_tokens` of
whole documents instead, so a rerun trains on slightly different tokens) and its last {r['held_out_chars']:,} characters held out: never trained
on, not seen by the tokenizer. Every {r['steps'] // len(r['points'])} steps a checkpoint is scored on the
held-out text with `bitnet_train.evaluation.evaluate.evaluate` (as `bitnet-train eval CKPT --data held_out.txt`: packed
windows of 128 tokens, bits per UTF-8 byte; {r['points'][0]['eval_tokens']:,} tokens). CPU, {r['threads']}
torch threads. The picture shows each size and quant at its best peak LR among those run (lowest final
held-out bits per byte; the legend names it), the first table lists every run, and the gap compares best
with best. Interpretation: [eval.md](eval.md#quality-curves-bitnet-vs-full-precision).

```bash
{cmds}
```

![held-out bits per byte vs training tokens]({png})

{table(runs)}
Wall time of each run (training, then scoring): """ + "; ".join(
        f"{s}/{q} lr {lr_tag(lr)} {runs[s, q, lr]['train_seconds']:.0f} s + {runs[s, q, lr]['eval_seconds']:.0f} s "
        f"({runs[s, q, lr]['train_tokens_per_s']:,.0f} tokens/s)" for s, q, lr in ordered(runs)) + ".\n"


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
    r.add_argument("--lr", type=float, default=None,
                   help="peak LR (default: the recipe's); min_lr is scaled in the recipe's min/peak ratio")
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
