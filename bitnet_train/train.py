"""``bitnet-train pretrain RECIPE.yaml [--set key=value ...] [--resume]``: the pretraining recipe
and the setting up of a run (tokenizer, model, optimizer, data, the checkpoint it resumes from);
the loop itself is :mod:`bitnet_train.loop`, the checkpoints :mod:`bitnet_train.checkpointer`.

On ``accelerate``: one process (CPU, or one GPU), or several started by ``accelerate launch``
(DDP; FSDP2 with ``--use_fsdp`` or an accelerate config that selects FSDP: we then shard the
model ourselves with ``fully_shard``, on the CPU too, see :mod:`bitnet_train.distributed`). A
preset is built on the meta device and materialized per rank from the seed: the same weights at
any world size. bf16 autocast on GPUs, fp32 on the CPU (``train.mixed_precision``). AdamW (betas
0.9/0.95), a warm-up + cosine or the 2B4T two-stage LR schedule with an optional weight-decay
schedule, gradient clipping and accumulation, the quantization warm-up, optional
``torch.compile`` and activation checkpointing. Every process trains on its own blocks of the
one data stream (``open_training_data(rank=, world_size=)``): the global batch is
``batch_size * grad_accum * processes`` sequences.

Output directory (written by the main process only; under FSDP every rank writes its shard of
``dcp/``)::

    OUTPUT_DIR/metrics.jsonl            one line per optimizer step, one per evaluation
    OUTPUT_DIR/checkpoints/step-NNNNNN/ every train.save_every steps (the last keep_last kept):
                                        a model checkpoint plus optimizer.pt, rng.pt and
                                        trainer_state.json (step, tokens, data position), atomic;
                                        under FSDP dcp/ (each rank's shard of the model and the
                                        optimizer) instead of the weights and optimizer.pt
    OUTPUT_DIR/final/                   the model and tokenizer at the end

``--resume`` continues from the newest checkpoint, bit for bit on the CPU at the same world size
(one process, DDP or FSDP): the same losses as a run that was never interrupted. The LR and
weight decay are functions of the step, so the step restores the schedule. SIGINT/SIGTERM save a
checkpoint and exit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, RecipeError, TrainingError, UserError
from .recipe import load_recipe, to_dict
from .metrics import WandbConfig
from .schedule import stage2_step
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
    clip: float = field(default=1.0, metadata={"min": 0.0, "help": "gradient-norm clip; 0 = off (the norm is still logged and checked)"})
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
    eval_batches: int = field(default=8, metadata={
        "min": 0, "help": "validation: the first eval_batches x batch_size x processes held-out windows are scored; "
                          "0 = no validation"})
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


def _make_model(recipe: PretrainRecipe, tok, device="cpu", fsdp: bool = False):
    """The recipe's ``model:`` (see :func:`bitnet_train.model.load_model`) as a float32 model for
    ``tok`` on ``device``, sharded with FSDP2 when ``fsdp``. A preset is built on the meta device
    and materialized per rank (:func:`bitnet_train.distributed.materialize`: the same weights at
    any world size, each rank allocating only its shard); a checkpoint or ``hf:`` model is read
    whole, then sharded."""
    import torch

    from .distributed import materialize
    from .model import load_model, model_kind

    fresh = model_kind(recipe.model) == "preset"
    model = load_model(recipe.model, quant=recipe.quant, convert=recipe.convert, tokenizer=tok, seed=recipe.seed,
                       device="meta" if fresh else None)
    maxpos = getattr(model.config, "max_position_embeddings", None)
    if maxpos and recipe.data.seq_len > maxpos:
        raise RecipeError(f"data.seq_len {recipe.data.seq_len} exceeds the model's max_position_embeddings {maxpos}")
    model = model.to(torch.float32)
    if not fresh:
        model.to(device)
    return _finish_model(model, recipe, fsdp, lambda m: materialize(m, recipe.seed, device) if fresh else None)


def _resumed_model(recipe: PretrainRecipe, ck: Path, device, fsdp: bool):
    """The model of checkpoint ``ck``: with a sharded (``dcp/``) checkpoint, the architecture on
    the meta device, materialized per rank (its weights are then read with the optimizer, see
    :meth:`~bitnet_train.checkpointer.Checkpointer.prepare`); else the whole checkpoint."""
    import torch

    from .checkpoint import load_checkpoint
    from .distributed import DCP_DIR, materialize

    if (Path(ck) / DCP_DIR).is_dir():
        model = load_checkpoint(ck, device="meta").to(torch.float32)
        return _finish_model(model, recipe, fsdp, lambda m: materialize(m, recipe.seed, device, params=False))
    model = load_checkpoint(ck)
    model.to(device)
    return _finish_model(model, recipe, fsdp, lambda m: None)


def _finish_model(model, recipe: PretrainRecipe, fsdp: bool, materialize):
    """Activation checkpointing and (FSDP) per-layer compile, then sharding, then ``materialize``."""
    from .distributed import shard_model

    t = recipe.train
    if t.activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if fsdp:
        if t.compile:  # accelerate compiles what it prepares; under FSDP each decoder layer is compiled in place
            for layer in model.model.layers:
                layer.compile(backend="inductor")
        shard_model(model, _mixed_precision(t))
    materialize(model)
    return model


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


def _mixed_precision(t: TrainConfig) -> str:
    import torch

    mp = t.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    return mp


def _accelerator(t: TrainConfig):
    """The Accelerator: process group, device, backward and the loop's collectives. Under FSDP
    (:func:`bitnet_train.distributed.fsdp_requested`) the model is sharded by us, not by
    ``prepare``, so accelerate gets neither mixed precision (FSDP2's policy does it) nor dynamo."""
    import torch
    from accelerate import Accelerator

    from .distributed import fsdp_requested

    mp = _mixed_precision(t)
    if fsdp_requested():
        mp, dynamo = "no", None
    else:
        dynamo = "inductor" if t.compile else None
    # cpu=True without CUDA: several launched processes then form a gloo group (MULTI_CPU) instead
    # of each training alone
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available(), dynamo_backend=dynamo)


def _use_fsdp(acc) -> bool:
    """FSDP2 when the launch asks for it and its process group is up (one launched process too)."""
    import torch.distributed as dist

    from .distributed import fsdp_requested

    return fsdp_requested() and dist.is_available() and dist.is_initialized()


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
    from .fsutil import owned

    acc = _accelerator(recipe.train)
    try:
        with owned(recipe.output_dir, "pretrain"):  # a second run into the same output_dir is refused
            return _run(recipe, resume, stop_after, progress, acc)
    finally:
        _reset_accelerate(acc)


def _run(recipe: PretrainRecipe, resume: bool, stop_after: int | None, progress: bool, acc) -> dict:
    """Set the run up (fresh, or from the newest checkpoint), then :func:`~bitnet_train.loop.train_loop`."""
    from tqdm.auto import tqdm

    from .checkpointer import Checkpointer, TrainState, resume_point, seed_all
    from .data import open_training_data
    from .fsutil import clean_stale
    from .optim import build_optimizer, init_adamw_state
    from .loop import Evaluator, StopSignal, train_loop
    from .metrics import MetricsLog, WandbLogger, plot_loss

    out, t = Path(recipe.output_dir), recipe.train
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    start = resume_point(out, resume, "pretrain", announce=main)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        clean_stale(out / "checkpoints")  # directories a process killed while saving left behind
        clean_stale(out)  # and an interrupted overwrite of final/ (its previous copy comes back)
    ck = start[1] if start is not None else None

    fsdp = _use_fsdp(acc)
    if ck is None:
        seed_all(recipe.seed)
        tok = _get_tokenizer(recipe, acc, out)
        model = _make_model(recipe, tok, acc.device, fsdp)
        state = TrainState()
    else:
        from transformers import AutoTokenizer

        from .tokenizer import ensure_special_tokens

        from .checkpointer import check_resume_recipe

        changed = check_resume_recipe(ck, to_dict(recipe))
        if changed and main:
            print(f"pretrain: resuming with changed schedule keys ({'; '.join(changed)})", file=sys.stderr)
        state = TrainState.read(ck)
        tok = ensure_special_tokens(AutoTokenizer.from_pretrained(ck))
        model = _resumed_model(recipe, ck, acc.device, fsdp)
    model.train()

    recipe_dict = to_dict(recipe)
    ckpt = Checkpointer(out, acc, tok, recipe_dict, t.keep_last)
    opt = build_optimizer(model, t.lr, t.weight_decay)
    model, opt = ckpt.prepare(model, opt, ck)
    if ck is None:
        init_adamw_state(opt)  # before the first forward, as a resumed run's (bitnet_train/optim.py)

    data = open_training_data(recipe.data, tok, recipe.seed, rank=rank, world_size=world)
    # the same validation windows at any world size: the first eval_batches global batches, one share per rank
    val = data.validation() if t.eval_batches else None
    blocks = data.train_blocks(state.data_position)
    if main:
        wandb_run = WandbLogger(recipe.wandb, out, recipe_dict, None if ck is None else state.step)
        metrics = MetricsLog(out / "metrics.jsonl", keep_upto=None if ck is None else state.step, sink=wandb_run)

    def log(rec: dict) -> None:
        if main:
            metrics.write(rec)

    def save(final: bool = False) -> Path:
        path = ckpt.save(model, opt, state, final=final)
        if main:
            plot_loss(out / "metrics.jsonl", out / "loss.png")
        acc.wait_for_everyone()
        return path

    from .stream import HeldOut

    evaluate = Evaluator(val or HeldOut([], None, 0, 0), t.batch_size, acc, limit=t.eval_batches * t.batch_size * world)
    bar = tqdm(total=t.max_steps, initial=state.step, desc="pretrain", unit="step", disable=not (progress and main),
               dynamic_ncols=True)
    try:
        with StopSignal(acc, stop_after) as stop:
            summary = train_loop(model, opt, blocks, state, recipe, acc, evaluate, save, log, stop, bar, fresh=ck is None)
    finally:
        bar.close()
        if main:
            metrics.close()
            wandb_run.finish()
    summary["fsdp"] = fsdp
    if summary.get("interrupted"):
        if main:
            print(f"pretrain: stopped at step {state.step}; checkpoint saved, continue with --resume", file=sys.stderr)
        return summary
    save(final=True)
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
