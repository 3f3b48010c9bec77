"""``bitnet-train pretrain RECIPE.yaml [--set key=value ...] [--resume]``: the pretraining loop.

On ``accelerate``: one process (CPU, or one GPU), or several started by ``accelerate launch``
(DDP; FSDP when the accelerate config selects it). bf16 autocast on GPUs, fp32 on the CPU
(``train.mixed_precision``). AdamW (betas 0.9/0.95), a warm-up + cosine or the 2B4T two-stage LR
schedule with an optional weight-decay schedule, gradient clipping and accumulation, the
quantization warm-up, optional ``torch.compile`` and activation checkpointing. Every process
trains on its own blocks of the one data stream (``open_training_data(rank=, world_size=)``):
the global batch is ``batch_size * grad_accum * processes`` sequences.

Output directory (written by the main process only)::

    OUTPUT_DIR/metrics.jsonl            one line per optimizer step, one per evaluation
    OUTPUT_DIR/checkpoints/step-NNNNNN/ every train.save_every steps (the last keep_last kept):
                                        a model checkpoint plus optimizer.pt, rng.pt and
                                        trainer_state.json (step, tokens, data position), atomic
    OUTPUT_DIR/final/                   the model and tokenizer at the end

``--resume`` continues from the newest checkpoint, bit for bit on the CPU in one process: the
same losses as a run that was never interrupted. The LR and weight decay are functions of the
step, so the step restores the schedule. SIGINT/SIGTERM save a checkpoint and exit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, RecipeError, TrainingError, UserError
from .recipe import load_recipe, to_dict
from .data import DataConfig
from .warmup import QuantWarmupConfig
from .convert import ConvertConfig


# ----------------------------------------------------------------------------- recipe schema


@dataclass
class TrainConfig:
    max_steps: int = field(metadata={"min": 1, "help": "optimizer steps"})
    save_every: int = field(metadata={"min": 1, "help": "checkpoint every N optimizer steps"})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "sequences per micro-batch (per process)"})
    grad_accum: int = field(default=1, metadata={"min": 1, "help": "micro-batches per optimizer step"})
    lr: float = field(default=1.5e-3, metadata={"min": 0.0, "help": "peak learning rate"})
    warmup_steps: int = field(default=100, metadata={"min": 0, "help": "linear LR warm-up steps"})
    min_lr: float = field(default=1.5e-4, metadata={"min": 0.0, "help": "LR at the end of the (stage-one) cosine decay"})
    schedule: str = field(
        default="cosine",
        metadata={"choices": ("cosine", "two_stage"),
                  "help": "cosine: warm-up, cosine lr -> min_lr; two_stage: that cosine until stage2_start, "
                          "then a drop to a stage2_lr -> stage2_min_lr cosine cooldown (BitNet b1.58 2B4T)"},
    )
    stage2_start: float = field(
        default=0.5, metadata={"min": 0.0, "max": 1.0, "help": "two_stage: where stage two begins, as a fraction of max_steps"})
    stage2_lr: float | None = field(default=None, metadata={"min": 0.0, "help": "two_stage: peak LR of the cooldown"})
    stage2_min_lr: float = field(default=0.0, metadata={"min": 0.0, "help": "two_stage: LR at the last step"})
    weight_decay: float = field(default=0.1, metadata={"min": 0.0, "help": "AdamW decay of matrices (the peak, for a cosine)"})
    weight_decay_schedule: str = field(
        default="constant",
        metadata={"choices": ("constant", "cosine"),
                  "help": "cosine: weight_decay -> 0 along a cosine over the run (over stage one for two_stage)"},
    )
    stage2_weight_decay: float = field(default=0.0, metadata={"min": 0.0, "help": "two_stage: weight decay in stage two"})
    clip: float = field(default=1.0, metadata={"min": 0.0, "help": "gradient-norm clip; 0 = off"})
    non_finite: str = field(
        default="stop",
        metadata={"choices": ("stop", "skip"),
                  "help": "a non-finite loss or gradient norm: stop the run (exit 1), or skip that step's update"},
    )
    mixed_precision: str = field(
        default="auto",
        metadata={"choices": ("auto", "no", "bf16"), "help": "auto: bf16 autocast on a GPU, fp32 on the CPU"},
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (inductor)"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    eval_every: int = field(default=100, metadata={"min": 0, "help": "validate every N steps; 0 = only at the end"})
    eval_batches: int = field(default=8, metadata={"min": 0, "help": "validation micro-batches per evaluation"})
    keep_last: int = field(default=3, metadata={"min": 1, "help": "checkpoints kept"})

    def validate(self):
        if self.min_lr > self.lr:
            raise RecipeError(f"train.min_lr {self.min_lr} is above train.lr {self.lr}")
        if self.schedule == "two_stage":
            if self.stage2_lr is None:
                raise RecipeError("train.schedule is two_stage but train.stage2_lr is not set")
            if self.stage2_lr > self.lr:
                raise RecipeError(f"train.stage2_lr {self.stage2_lr} is above train.lr {self.lr}")
            if self.stage2_min_lr > self.stage2_lr:
                raise RecipeError(f"train.stage2_min_lr {self.stage2_min_lr} is above train.stage2_lr {self.stage2_lr}")
            if stage2_step(self) <= self.warmup_steps:
                raise RecipeError(
                    f"train.stage2_start {self.stage2_start} puts stage two (step {stage2_step(self)}) inside the "
                    f"{self.warmup_steps}-step warm-up"
                )


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


# ----------------------------------------------------------------------------- helpers


def _cosine(hi: float, lo: float, progress: float) -> float:
    progress = min(1.0, max(0.0, progress))
    return lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * progress))


def stage2_step(t: TrainConfig) -> int:
    """First optimizer step (0-based) of stage two of a two_stage schedule."""
    return int(round(t.stage2_start * t.max_steps))


def lr_at(step: int, t: TrainConfig) -> float:
    """LR of optimizer step ``step`` (0-based).

    ``cosine``: linear warm-up to ``lr``, then a cosine to ``min_lr`` at ``max_steps``.
    ``two_stage``: the same curve until ``stage2_step`` (cut there, before it reaches ``min_lr``),
    then an abrupt drop to ``stage2_lr`` and a cosine from it to ``stage2_min_lr`` at the last step.
    """
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "two_stage":
        s2 = stage2_step(t)
        if step >= s2:
            return _cosine(t.stage2_lr, t.stage2_min_lr, (step - s2) / max(1, t.max_steps - 1 - s2))
    span = max(1, t.max_steps - t.warmup_steps)
    return _cosine(t.lr, t.min_lr, (step - t.warmup_steps) / span)


def weight_decay_at(step: int, t: TrainConfig) -> float:
    """AdamW weight decay (of the matrices) at optimizer step ``step`` (0-based).

    ``constant``: ``weight_decay``. ``cosine``: from ``weight_decay`` down to 0 along a cosine over
    the run, or, with the two_stage LR schedule, over stage one. In stage two of a two_stage
    schedule it is ``stage2_weight_decay`` (0 by default, as in the 2B4T report)."""
    end = t.max_steps
    if t.schedule == "two_stage":
        end = stage2_step(t)
        if step >= end:
            return t.stage2_weight_decay
    if t.weight_decay_schedule == "constant":
        return t.weight_decay
    return _cosine(t.weight_decay, 0.0, step / max(1, end))


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
    """The recipe's ``model:`` (see :func:`bitnet_train.model.load_model`) as a float32 model for ``tok``."""
    import torch

    from .model import load_model

    model = load_model(recipe.model, quant=recipe.quant, convert=recipe.convert, tokenizer=tok, seed=recipe.seed)
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
    train = [(r["step"], r["loss"]) for r in recs if r.get("loss") is not None]
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


def _accelerator(t: TrainConfig):
    import torch
    from accelerate import Accelerator

    mp = t.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    # cpu=True without CUDA: several launched processes then form a gloo group (MULTI_CPU) instead
    # of each training alone
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available(),
                       dynamo_backend="inductor" if t.compile else None)


def _reset_accelerate(acc) -> None:
    """Forget the Accelerator's process-wide settings (mixed precision, dynamo) after a
    single-process run, so that the next pretrain() in this process may choose others."""
    from accelerate.state import AcceleratorState

    if acc.num_processes == 1:
        AcceleratorState._reset_state()


def _get_tokenizer(recipe: PretrainRecipe, acc, out: Path):
    """The tokenizer of a fresh run. With several processes the main one makes it (a BPE trained
    on the data, or a download) and the others read its copy, so every rank has the same one."""
    if acc.num_processes == 1:
        return _make_tokenizer(recipe)
    from transformers import AutoTokenizer

    from .fsutil import atomic_dir
    from .tokenizer import ensure_special_tokens

    shared = out / "tokenizer"
    if acc.is_main_process:
        tok = _make_tokenizer(recipe)
        with atomic_dir(shared) as tmp:
            tok.save_pretrained(tmp)
    acc.wait_for_everyone()
    if not acc.is_main_process:
        tok = ensure_special_tokens(AutoTokenizer.from_pretrained(shared))
    return tok


def _pretrain(recipe: PretrainRecipe, resume: bool, stop_after: int | None, progress: bool) -> dict:
    acc = _accelerator(recipe.train)
    try:
        return _run(recipe, resume, stop_after, progress, acc)
    finally:
        _reset_accelerate(acc)


def _run(recipe: PretrainRecipe, resume: bool, stop_after: int | None, progress: bool, acc) -> dict:
    import torch
    import torch.nn.functional as F
    from accelerate.utils import DistributedType, gather_object
    from tqdm.auto import tqdm

    from .checkpoint import CheckpointError, load_checkpoint, load_state_file, save_checkpoint
    from .checkpointer import list_checkpoints, resume_point
    from .data import DataPosition, open_training_data
    from .fsutil import clean_stale
    from .warmup import apply_warmup

    out = Path(recipe.output_dir)
    t = recipe.train
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    fsdp = acc.distributed_type == DistributedType.FSDP
    start = resume_point(out, resume, "pretrain", announce=main)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        clean_stale(out / "checkpoints")  # directories a process killed while saving left behind
        clean_stale(out)  # and an interrupted overwrite of final/ (its previous copy comes back)

    if start is None:
        _seed_all(recipe.seed)
        tok = _get_tokenizer(recipe, acc, out)
        model = _make_model(recipe, tok)
        step, tokens_seen, pos = 0, 0, DataPosition()
    else:
        from transformers import AutoTokenizer

        from .tokenizer import ensure_special_tokens

        step, ck = start
        try:
            state = json.loads((ck / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{ck / 'trainer_state.json'}: cannot read the training state: {e}") from None
        tok = ensure_special_tokens(AutoTokenizer.from_pretrained(ck))
        model = load_checkpoint(ck)
        tokens_seen = int(state["tokens"])
        pos = DataPosition.from_dict(state["data_position"])
    if t.activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.to(acc.device).train()

    opt = torch.optim.AdamW(_param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.95), eps=1e-8)
    if start is not None and not fsdp:
        opt.load_state_dict(load_state_file(start[1] / "optimizer.pt", "optimizer state"))
    model, opt = acc.prepare(model, opt)
    if start is not None:
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            full = load_state_file(start[1] / "optimizer.pt", "optimizer state")
            set_optimizer_state_dict(model, opt.optimizer, full, options=StateDictOptions(full_state_dict=True))
        rng = load_state_file(start[1] / "rng.pt", "random number generator state")
        if "per_rank" in rng:
            rng = rng["per_rank"][rank] if rank < len(rng["per_rank"]) else rng["per_rank"][0]
        _set_rng_state(rng)

    data = open_training_data(recipe.data, tok, recipe.seed, rank=rank, world_size=world)
    # the same validation blocks at any world size: eval_batches global batches, one share per rank
    val = data.validation(t.eval_batches * t.batch_size * world)
    val = val[: len(val) // world * world][rank::world]
    blocks = data.train_blocks(pos)
    recipe_dict = to_dict(recipe)
    if main:
        wandb_run = _WandbLogger(recipe.wandb, out, recipe_dict, None if start is None else step)
        metrics = _Metrics(out / "metrics.jsonl", keep_upto=None if start is None else step, sink=wandb_run)

    def log(rec: dict) -> None:
        if main:
            metrics.write(rec)

    def global_mean(v: float) -> float:
        if world == 1:
            return v
        return acc.reduce(torch.tensor([v], dtype=torch.float64, device=acc.device), "mean").item()

    def evaluate() -> float | None:
        if not val:
            return None
        model.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(val), t.batch_size):
                x = torch.tensor(val[i : i + t.batch_size], dtype=torch.long, device=acc.device)
                logits = model(input_ids=x[:, :-1]).logits
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="sum")
                total += loss.item()
                n += x[:, 1:].numel()
        model.train()
        if world > 1:
            total, n = acc.reduce(torch.tensor([total, n], dtype=torch.float64, device=acc.device), "sum").tolist()
        return total / n

    def save(step_: int, final: bool = False) -> Path:
        """Every rank calls this (gathers are collective); the main process writes."""
        ck_dir = out / "final" if final else out / "checkpoints" / f"step-{step_:06d}"
        # ranks stop at different blocks of a round; the furthest position has consumed them all
        positions = gather_object([pos.to_dict()]) if world > 1 else [pos.to_dict()]
        position = max(positions, key=lambda d: (d["epoch"], d["taken"]))
        rngs = gather_object([_rng_state()]) if world > 1 else None
        state_dict = acc.get_state_dict(model) if fsdp else None
        if final:
            opt_state = None
        elif fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opt_state = get_optimizer_state_dict(
                model, opt.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            opt_state = opt.state_dict()
        if main:
            state = {"step": step_, "tokens": tokens_seen, "data_position": position, "world_size": world,
                     "skipped_steps": skipped, "recipe": recipe_dict}

            def extra(tmp: Path):
                torch.save(opt_state, tmp / "optimizer.pt")
                torch.save(_rng_state() if rngs is None else {"per_rank": rngs}, tmp / "rng.pt")
                (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))

            unwrapped = acc.unwrap_model(model, keep_torch_compile=False)
            if final:
                save_checkpoint(unwrapped, ck_dir, tokenizer=tok, state_dict=state_dict,
                                extra={"stage": "pretrain", "step": step_, "recipe": recipe_dict})
            else:
                save_checkpoint(unwrapped, ck_dir, tokenizer=tok, state_dict=state_dict,
                                extra={"stage": "pretrain", "step": step_}, write_extra=extra)
                for _, old in list_checkpoints(out)[: -t.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
            plot_loss(out / "metrics.jsonl", out / "loss.png")
        acc.wait_for_everyone()
        return ck_dir

    stop = {"sig": None}

    def on_signal(signum, _frame):
        stop["sig"] = signum

    def should_stop() -> bool:
        flag = stop["sig"] is not None or (stop_after is not None and step >= stop_after)
        if world > 1:  # every rank must leave the loop at the same step
            flag = bool(acc.reduce(torch.tensor([int(flag)], device=acc.device), "sum").item())
        return flag

    old_handlers = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            old_handlers[s] = signal.signal(s, on_signal)
        except ValueError:  # not the main thread
            pass

    tokens_per_step = t.batch_size * t.grad_accum * recipe.data.seq_len * world
    skipped = int(state.get("skipped_steps", 0)) if start is not None else 0
    first_val = last_val = None
    if start is None and t.eval_every:
        first_val = evaluate()
        if first_val is not None:
            log({"step": 0, "val_loss": first_val})
    bar = tqdm(total=t.max_steps, initial=step, desc="pretrain", unit="step", disable=not (progress and main),
               dynamic_ncols=True)
    interrupted = False
    last_loss = None
    try:
        while step < t.max_steps:
            t0 = time.perf_counter()
            if recipe.quant == "bitnet":
                apply_warmup(model, step, recipe.quant_warmup)
            lr, wd = lr_at(step, t), weight_decay_at(step, t)
            opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = lr
            opt.param_groups[0]["weight_decay"] = wd  # group 1 (vectors) is never decayed
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for i in range(t.grad_accum):
                x = torch.tensor([next(blocks) for _ in range(t.batch_size)], dtype=torch.long, device=acc.device)
                # gradients are all-reduced across ranks only on the last micro-batch
                with acc.no_sync(model) if i < t.grad_accum - 1 else contextlib.nullcontext():
                    logits = model(input_ids=x[:, :-1]).logits
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
                    acc.backward(loss / t.grad_accum)
                loss_sum += loss.item()
            loss_val = global_mean(loss_sum / t.grad_accum)
            problem = None if math.isfinite(loss_val) else f"non-finite loss {loss_val}"
            grad_norm = None
            if problem is None and t.clip > 0:
                grad_norm = float(acc.clip_grad_norm_(model.parameters(), t.clip))
                if not math.isfinite(grad_norm):
                    problem = f"non-finite gradient norm {grad_norm}"
            if problem is not None and t.non_finite == "stop":
                raise TrainingError(f"{problem} at step {step + 1}; lower train.lr or check the data "
                                    f"(train.non_finite: skip drops such steps instead)")
            if problem is None:
                opt.step()
            else:
                opt.zero_grad(set_to_none=True)
                skipped += 1
            step += 1
            tokens_seen += tokens_per_step
            dt = time.perf_counter() - t0
            tps = tokens_per_step / dt if dt > 0 else 0.0
            rec = {"step": step, "loss": loss_val if problem is None else None, "lr": lr, "weight_decay": wd,
                   "tokens": tokens_seen, "tokens_per_s": round(tps, 1)}
            if grad_norm is not None:
                rec["grad_norm"] = grad_norm
            if problem is not None:
                rec.update(skipped=problem, skipped_steps=skipped)
                bar.write(f"step {step}: {problem}; update skipped ({skipped} so far)")
            else:
                last_loss = loss_val
            log(rec)
            bar.update(1)
            post = {"loss": f"{loss_val:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tps:,.0f}"}
            if skipped:
                post["skipped"] = skipped
            bar.set_postfix(post)
            if (t.eval_every and step % t.eval_every == 0) or step == t.max_steps:
                last_val = evaluate()
                if last_val is not None:
                    log({"step": step, "val_loss": last_val})
                    bar.write(f"step {step}: val_loss {last_val:.4f}")
            if step % t.save_every == 0 or step == t.max_steps:
                save(step)
            if should_stop():
                interrupted = True
                if step % t.save_every and step != t.max_steps:
                    save(step)
                break
    finally:
        bar.close()
        if main:
            metrics.close()
            wandb_run.finish()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    summary = {"step": step, "tokens": tokens_seen, "loss": last_loss, "first_val_loss": first_val,
               "val_loss": last_val, "skipped_steps": skipped, "world_size": world}
    if interrupted:
        summary["interrupted"] = True
        if main:
            print(f"pretrain: stopped at step {step}; checkpoint saved, continue with --resume", file=sys.stderr)
        return summary
    save(step, final=True)
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
