"""``bitnet-train pretrain RECIPE.yaml [--set key=value ...] [--resume]``: the pretraining loop.

Single process (CPU, or one GPU when there is one). AdamW (betas 0.9/0.95), linear warm-up then
cosine decay to ``min_lr``, gradient clipping and accumulation, the quantization warm-up.

Output directory::

    OUTPUT_DIR/metrics.jsonl            one line per optimizer step, one per evaluation
    OUTPUT_DIR/checkpoints/step-NNNNNN/ every train.save_every steps (the last keep_last kept):
                                        a model checkpoint plus optimizer.pt, scheduler.pt,
                                        rng.pt and trainer_state.json, written atomically
    OUTPUT_DIR/final/                   the model and tokenizer at the end

``--resume`` continues from the newest checkpoint, bit for bit on the CPU: the same losses as a
run that was never interrupted. SIGINT/SIGTERM save a checkpoint and exit.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .recipe import RecipeError, load_recipe, to_dict
from .data import DataConfig
from .warmup import QuantWarmupConfig
from .convert import ConvertConfig


# ----------------------------------------------------------------------------- recipe schema


@dataclass
class TrainConfig:
    max_steps: int = field(metadata={"min": 1, "help": "optimizer steps"})
    save_every: int = field(metadata={"min": 1, "help": "checkpoint every N optimizer steps"})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"min": 1, "help": "micro-batches per optimizer step"})
    lr: float = field(default=1.5e-3, metadata={"min": 0.0, "help": "peak learning rate"})
    warmup_steps: int = field(default=100, metadata={"min": 0, "help": "linear LR warm-up steps"})
    min_lr: float = field(default=1.5e-4, metadata={"min": 0.0, "help": "LR at the end of the cosine decay"})
    weight_decay: float = field(default=0.1, metadata={"min": 0.0, "help": "AdamW decay of matrices"})
    clip: float = field(default=1.0, metadata={"min": 0.0, "help": "gradient-norm clip; 0 = off"})
    eval_every: int = field(default=100, metadata={"min": 0, "help": "validate every N steps; 0 = only at the end"})
    eval_batches: int = field(default=8, metadata={"min": 0, "help": "validation micro-batches per evaluation"})
    keep_last: int = field(default=3, metadata={"min": 1, "help": "checkpoints kept"})

    def validate(self):
        if self.min_lr > self.lr:
            raise RecipeError(f"train.min_lr {self.min_lr} is above train.lr {self.lr}")


@dataclass
class WandbConfig:
    enabled: bool = field(default=False, metadata={"help": "log metrics to Weights & Biases"})
    project: str = field(default="bitnet-train", metadata={"help": "wandb project"})
    name: str | None = field(default=None, metadata={"help": "run name (default: wandb's)"})
    mode: str | None = field(
        default=None,
        metadata={"choices": ("online", "offline", "disabled"),
                  "help": "default: $WANDB_MODE, else online with credentials, offline without"},
    )


@dataclass
class PretrainRecipe:
    output_dir: str = field(metadata={"help": "where metrics, checkpoints and final/ go"})
    seed: int = field(metadata={"help": "seeds the model init, the data order and torch"})
    model: str = field(metadata={"help": "preset name, preset YAML, checkpoint dir, or hf:<dir or hub id> (converted on load)"})
    data: DataConfig
    train: TrainConfig
    quant: str = field(default="bitnet", metadata={"choices": ("bitnet", "none"), "help": "none = fp baseline"})
    quant_warmup: QuantWarmupConfig = field(default_factory=QuantWarmupConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def load_pretrain_recipe(path, overrides=None) -> PretrainRecipe:
    return load_recipe(PretrainRecipe, path, overrides)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, ...); the message names the step."""


# ----------------------------------------------------------------------------- helpers


def lr_at(step: int, t: TrainConfig) -> float:
    """LR of optimizer step ``step`` (0-based): linear warm-up, then cosine to min_lr."""
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


CKPT_RE = re.compile(r"^step-(\d{6,})$")


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    d = out / "checkpoints"
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = CKPT_RE.match(p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _make_tokenizer(recipe: PretrainRecipe):
    from .data import make_tokenizer

    spec = recipe.data.tokenizer
    if recipe.model.startswith("hf:"):
        # a pretrained model comes with its vocabulary: a BPE trained on our data would not match
        # its embeddings. The default data.tokenizer means "the model's own".
        from dataclasses import fields

        from .convert import load_hf_tokenizer

        default = next(f.default for f in fields(type(recipe.data)) if f.name == "tokenizer")
        if spec.startswith("bpe:") and spec != default:
            raise RecipeError(
                f"data.tokenizer {spec!r} trains a new vocabulary, which does not match the embeddings of "
                f"model {recipe.model!r}; leave data.tokenizer out (the model's own tokenizer is used) or name "
                "a tokenizer with the model's vocabulary"
            )
        if spec.startswith("bpe:"):
            return load_hf_tokenizer(recipe.model[3:])
    return make_tokenizer(recipe.data)


def _make_model(recipe: PretrainRecipe, tok):
    import torch

    from .bitlinear import bitlinear_modules
    from .model import build_model, load_model

    spec = recipe.model
    if spec.startswith("hf:") or Path(spec).is_dir():
        c = recipe.convert
        kw = {}
        if spec.startswith("hf:"):
            kw = {"quant": recipe.quant, "exclude": c.exclude, "use_rms_norm": c.use_rms_norm, "rms_norm_eps": c.rms_norm_eps}
        model = load_model(spec, **kw)
        if recipe.quant == "none" and model.config.bitnet_train.get("quant") == "bitnet":
            raise RecipeError(f"quant: none, but model {spec!r} is a ternary checkpoint")
        if recipe.quant == "bitnet" and not bitlinear_modules(model):
            # a full-precision checkpoint fine-tuned into ternary: convert it like hf:<dir>
            from .convert import convert_model

            convert_model(model, c.exclude, c.use_rms_norm, c.rms_norm_eps, where=f"model {spec!r}")
            model.config.bitnet_train = {**(model.config.bitnet_train or {}), "quant": "bitnet"}
        n_emb = model.get_input_embeddings().weight.shape[0]
        if n_emb < len(tok):
            raise RecipeError(
                f"model {spec!r} has {n_emb} token embeddings, fewer than the {len(tok)} tokens of tokenizer "
                f"{getattr(tok, 'name_or_path', '') or recipe.data.tokenizer!r}; use the model's own tokenizer"
            )
    else:
        model = build_model(
            spec,
            quant=recipe.quant,
            seed=recipe.seed,
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    maxpos = getattr(model.config, "max_position_embeddings", None)
    if maxpos and recipe.data.seq_len > maxpos:
        raise RecipeError(f"data.seq_len {recipe.data.seq_len} exceeds the model's max_position_embeddings {maxpos}")
    return model.to(torch.float32)


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict:
    import numpy as np
    import torch

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    import numpy as np
    import torch

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def plot_loss(metrics_path: Path, png_path: Path) -> Path | None:
    """Write the loss curve (training loss per step, validation loss per evaluation) as a PNG,
    atomically. Returns None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("pretrain: matplotlib not installed, no loss-curve PNG (pip install matplotlib)", file=sys.stderr)
        return None
    from .fsutil import atomic_path

    recs = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(png_path)


def _wandb_mode(cfg: "WandbConfig") -> str:
    if cfg.mode:
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    netrc = Path.home() / ".netrc"
    if not has_key and netrc.is_file():
        has_key = "api.wandb.ai" in netrc.read_text(errors="ignore")
    return "online" if has_key else "offline"


class _WandbLogger:
    """wandb when the recipe enables it (offline without credentials), else nothing."""

    def __init__(self, cfg: "WandbConfig", out: Path, recipe_dict: dict, resume_step: int | None):
        self.run = None
        if not cfg.enabled:
            return
        try:
            import wandb
        except ImportError:
            raise RecipeError("wandb.enabled is true but wandb is not installed (pip install wandb)") from None
        self.run = wandb.init(
            project=cfg.project, name=cfg.name, config=recipe_dict, dir=str(out), mode=_wandb_mode(cfg),
            resume="allow" if resume_step is not None else None,
        )

    def log(self, rec: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class _Metrics:
    def __init__(self, path: Path, keep_upto: int | None, sink=None):
        self.path = path
        self.sink = sink
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_upto is None:
            path.write_text("")
        elif path.exists():
            # drop lines written after the checkpoint we resume from
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= keep_upto]
            path.write_text("".join(k + "\n" for k in kept))
        self.f = open(path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.sink is not None:
            self.sink.log(rec)

    def close(self):
        self.f.close()


# ----------------------------------------------------------------------------- the loop


def pretrain(recipe: PretrainRecipe, resume: bool = False, stop_after: int | None = None, progress: bool = True) -> dict:
    """Run (or resume) a pretraining recipe. Returns a summary dict.

    ``stop_after`` (for tests) acts like a SIGINT after that optimizer step: save and return.
    """
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its per-save "Writing model shards" bars would break ours
    try:
        return _pretrain(recipe, resume, stop_after, progress)
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _pretrain(recipe: PretrainRecipe, resume: bool, stop_after: int | None, progress: bool) -> dict:
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from .checkpoint import load_checkpoint, save_checkpoint
    from .data import DataPosition, open_training_data
    from .fsutil import clean_stale
    from .warmup import apply_warmup

    out = Path(recipe.output_dir)
    t = recipe.train
    ckpts = list_checkpoints(out)
    if ckpts and not resume:
        raise RecipeError(
            f"output_dir {str(out)!r} already holds checkpoints; pass --resume to continue, or choose another output_dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    clean_stale(out / "checkpoints")
    start = ckpts[-1] if (resume and ckpts) else None
    if resume and start is None:
        print(f"pretrain: no checkpoint in {out}/checkpoints; starting from scratch", file=sys.stderr)

    if start is None:
        _seed_all(recipe.seed)
        tok = _make_tokenizer(recipe)
        model = _make_model(recipe, tok)
        step, tokens_seen, pos = 0, 0, DataPosition()
    else:
        from transformers import AutoTokenizer

        from .tokenizer import ensure_special_tokens

        step, ck = start
        state = json.loads((ck / "trainer_state.json").read_text())
        tok = ensure_special_tokens(AutoTokenizer.from_pretrained(ck))
        model = load_checkpoint(ck)
        tokens_seen = int(state["tokens"])
        pos = DataPosition.from_dict(state["data_position"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()

    opt = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, t) / t.lr if t.lr > 0 else 0.0)
    if start is not None:
        ck = start[1]
        opt.load_state_dict(torch.load(ck / "optimizer.pt", weights_only=False))
        sched.load_state_dict(torch.load(ck / "scheduler.pt", weights_only=False))
        _set_rng_state(torch.load(ck / "rng.pt", weights_only=False))

    data = open_training_data(recipe.data, tok, recipe.seed)
    val = data.validation(t.eval_batches * t.batch_size)
    blocks = data.train_blocks(pos)
    recipe_dict = to_dict(recipe)
    wandb_run = _WandbLogger(recipe.wandb, out, recipe_dict, None if start is None else step)
    metrics = _Metrics(out / "metrics.jsonl", keep_upto=None if start is None else step, sink=wandb_run)

    def evaluate() -> float | None:
        if not val:
            return None
        model.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(val), t.batch_size):
                x = torch.tensor(val[i : i + t.batch_size], dtype=torch.long, device=device)
                logits = model(input_ids=x[:, :-1]).logits
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="sum")
                total += loss.item()
                n += x[:, 1:].numel()
        model.train()
        return total / n

    def save(step_: int) -> Path:
        ck_dir = out / "checkpoints" / f"step-{step_:06d}"
        state = {"step": step_, "tokens": tokens_seen, "data_position": pos.to_dict(), "recipe": recipe_dict}

        def extra(tmp: Path):
            torch.save(opt.state_dict(), tmp / "optimizer.pt")
            torch.save(sched.state_dict(), tmp / "scheduler.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))

        save_checkpoint(model, ck_dir, tokenizer=tok, extra={"stage": "pretrain", "step": step_}, write_extra=extra)
        plot_loss(out / "metrics.jsonl", out / "loss.png")
        for _, old in list_checkpoints(out)[: -t.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return ck_dir

    stop = {"sig": None}

    def on_signal(signum, _frame):
        stop["sig"] = signum

    old_handlers = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            old_handlers[s] = signal.signal(s, on_signal)
        except ValueError:  # not the main thread
            pass

    tokens_per_step = t.batch_size * t.grad_accum * recipe.data.seq_len
    first_val = last_val = None
    if start is None and t.eval_every:
        first_val = evaluate()
        if first_val is not None:
            metrics.write({"step": 0, "val_loss": first_val})
    bar = tqdm(total=t.max_steps, initial=step, desc="pretrain", disable=not progress, dynamic_ncols=True)
    interrupted = False
    last_loss = None
    try:
        while step < t.max_steps:
            t0 = time.perf_counter()
            if recipe.quant == "bitnet":
                apply_warmup(model, step, recipe.quant_warmup)
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for _ in range(t.grad_accum):
                x = torch.tensor([next(blocks) for _ in range(t.batch_size)], dtype=torch.long, device=device)
                logits = model(input_ids=x[:, :-1]).logits
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
                (loss / t.grad_accum).backward()
                loss_sum += loss.item()
            loss_val = loss_sum / t.grad_accum
            if not math.isfinite(loss_val):
                raise TrainingError(f"non-finite loss {loss_val} at step {step + 1}; lower train.lr or check the data")
            lr = opt.param_groups[0]["lr"]
            if t.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip)
            opt.step()
            sched.step()
            step += 1
            tokens_seen += tokens_per_step
            dt = time.perf_counter() - t0
            tps = tokens_per_step / dt if dt > 0 else 0.0
            last_loss = loss_val
            metrics.write({"step": step, "loss": loss_val, "lr": lr, "tokens": tokens_seen, "tokens_per_s": round(tps, 1)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            if (t.eval_every and step % t.eval_every == 0) or step == t.max_steps:
                last_val = evaluate()
                if last_val is not None:
                    metrics.write({"step": step, "val_loss": last_val})
                    bar.write(f"step {step}: val_loss {last_val:.4f}")
            if step % t.save_every == 0 or step == t.max_steps:
                save(step)
            if stop["sig"] is not None or (stop_after is not None and step >= stop_after):
                interrupted = True
                if step % t.save_every and step != t.max_steps:
                    save(step)
                break
    finally:
        bar.close()
        metrics.close()
        wandb_run.finish()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    summary = {"step": step, "tokens": tokens_seen, "loss": last_loss, "first_val_loss": first_val, "val_loss": last_val}
    if interrupted:
        summary["interrupted"] = True
        print(f"pretrain: stopped at step {step}; checkpoint saved, continue with --resume", file=sys.stderr)
        return summary
    save_checkpoint(model, out / "final", tokenizer=tok, extra={"stage": "pretrain", "step": step, "recipe": recipe_dict})
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    summary["final"] = str(out / "final")
    return summary


# ----------------------------------------------------------------------------- CLI


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a BitNet model from a YAML recipe")
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe key, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args) -> int:
    from .cli import UserError
    from .data import DataError

    recipe = load_pretrain_recipe(args.recipe, args.overrides)
    try:
        s = pretrain(recipe, resume=args.resume, progress=not args.no_progress)
    except DataError as e:
        raise UserError(str(e)) from None
    except TrainingError as e:
        print(f"bitnet-train pretrain: {e}", file=sys.stderr)
        return 1
    if s.get("interrupted"):
        return 130
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    vl = f"val_loss {f(s.get('first_val_loss'))} -> {f(s.get('val_loss'))}" if s.get("first_val_loss") is not None else f"val_loss {f(s.get('val_loss'))}"
    print(f"pretrain: {s['step']} steps, {s['tokens']:,} tokens, loss {f(s['loss'])}, {vl}; model in {s['final']}")
    return 0
