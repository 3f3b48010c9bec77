"""``bitnet-train pretrain RECIPE.yaml [--set key=value ...] [--resume]``: the pretraining recipe
(its schema, :class:`PretrainRecipe`) and the command. A run's pieces (tokenizer, model,
optimizer, objective, data, the checkpoint it resumes from) are built by :mod:`bitnet_train.training.run`,
the loop is :mod:`bitnet_train.training.loop`, the checkpoints :mod:`bitnet_train.checkpoint.checkpointer`.

On ``accelerate``: one process (CPU, or one GPU), or several started by ``accelerate launch``
(DDP; FSDP2 with ``--use_fsdp`` or an accelerate config that selects FSDP: we then shard the
model ourselves with ``fully_shard``, on the CPU too, see :mod:`bitnet_train.training.distributed`). A
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

from bitnet_train.errors import DataError, RecipeError, TrainingError, UserError
from bitnet_train.recipe import load_recipe
from bitnet_train.training.metrics import WandbConfig
from bitnet_train.training.schedule import stage2_step
from bitnet_train.data.config import DataConfig
from bitnet_train.training.quant_warmup import QuantWarmupConfig
from bitnet_train.modeling.convert import ConvertConfig
from bitnet_train.training.distill import DistillConfig


# ----------------------------------------------------------------------------- recipe schema


@dataclass
class TrainConfig:
    max_steps: int = field(metadata={"resume": "warn", "min": 1, "help": "optimizer steps"})
    save_every: int = field(metadata={"min": 1, "help": "checkpoint every N optimizer steps"})
    batch_size: int = field(default=8, metadata={"resume": "warn", "min": 1, "help": "sequences per micro-batch (per process)"})
    grad_accum: int = field(default=1, metadata={"resume": "warn", "min": 1, "help": "micro-batches per optimizer step"})
    lr: float = field(default=1.5e-3, metadata={"resume": "warn", "min": 0.0, "help": "peak learning rate"})
    warmup_steps: int = field(default=100, metadata={"resume": "warn", "min": 0, "help": "linear LR warm-up steps"})
    min_lr: float = field(default=1.5e-4, metadata={"resume": "warn", "min": 0.0, "help": "LR at the end of the (stage-one) cosine decay"})
    schedule: str = field(
        default="cosine",
        metadata={"resume": "warn", "choices": ("cosine", "two_stage"),
                  "help": "cosine: warm-up, cosine lr -> min_lr; two_stage: that cosine until stage2_start, "
                          "then a drop to a stage2_lr -> stage2_min_lr cosine cooldown (BitNet b1.58 2B4T)"},
    )
    stage2_start: float = field(
        default=0.5, metadata={"resume": "warn", "min": 0.0, "max": 1.0, "help": "two_stage: where stage two begins, as a fraction of max_steps"})
    stage2_lr: float | None = field(default=None, metadata={"resume": "warn", "min": 0.0, "help": "two_stage: peak LR of the cooldown"})
    stage2_min_lr: float = field(default=0.0, metadata={"resume": "warn", "min": 0.0, "help": "two_stage: LR at the last step"})
    weight_decay: float = field(default=0.1, metadata={"resume": "warn", "min": 0.0, "help": "AdamW decay of matrices (the peak, for a cosine)"})
    weight_decay_schedule: str = field(
        default="constant",
        metadata={"resume": "warn", "choices": ("constant", "cosine"),
                  "help": "cosine: weight_decay -> 0 along a cosine over the run (over stage one for two_stage)"},
    )
    stage2_weight_decay: float = field(default=0.0, metadata={"resume": "warn", "min": 0.0, "help": "two_stage: weight decay in stage two"})
    clip: float = field(default=1.0, metadata={"resume": "warn", "min": 0.0, "help": "gradient-norm clip; 0 = off (the norm is still logged and checked)"})
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
    seed: int = field(metadata={"resume": "refuse", "help": "seeds the model init, the data order and torch"})
    model: str = field(metadata={"help": "preset name, preset YAML, checkpoint dir, or hf:<dir or hub id> (converted on load)"})
    data: DataConfig = field(metadata={"resume": "refuse"})  # decides which data the saved position points into
    train: TrainConfig
    quant: str = field(default="bitnet", metadata={"resume": "refuse", "choices": ("bitnet", "none"), "help": "none = fp baseline"})
    quant_warmup: QuantWarmupConfig = field(default_factory=QuantWarmupConfig, metadata={"resume": "warn"})
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    distill: DistillConfig = field(default_factory=DistillConfig, metadata={"resume": "warn"})
    wandb: WandbConfig = field(default_factory=WandbConfig)


def load_pretrain_recipe(path, overrides=None) -> PretrainRecipe:
    return load_recipe(PretrainRecipe, path, overrides)


# ----------------------------------------------------------------------------- the run


def pretrain(recipe: PretrainRecipe, resume: bool = False, stop_after: int | None = None, progress: bool = True) -> dict:
    """Run (or resume) a pretraining recipe: :func:`~bitnet_train.training.run.open_run`, then
    :func:`~bitnet_train.training.loop.train_loop`, then ``final/``. Returns a summary dict.

    ``stop_after`` (for tests) acts like a SIGINT after that optimizer step: save and return.
    """
    from bitnet_train.fsutil import owned
    from bitnet_train.progress import library_bars_off
    from bitnet_train.training.run import make_accelerator, reset_accelerate

    # transformers' per-save "Writing model shards" bars would break ours
    with library_bars_off():
        acc = make_accelerator(recipe.train)
        try:
            with owned(recipe.output_dir, "pretrain"):  # a second run into the same output_dir is refused
                return _pretrain(recipe, resume, stop_after, progress, acc)
        finally:
            reset_accelerate(acc)


def _pretrain(recipe: PretrainRecipe, resume: bool, stop_after: int | None, progress: bool, acc) -> dict:
    from tqdm.auto import tqdm

    from bitnet_train.training.loop import StopSignal, train_loop
    from bitnet_train.training.run import open_run

    run = open_run(recipe, resume, acc)
    bar = tqdm(total=recipe.train.max_steps, initial=run.state.step, desc="pretrain", unit="step",
               disable=not (progress and run.main), dynamic_ncols=True)
    try:
        with StopSignal(acc, stop_after) as stop:
            summary = train_loop(run, stop, bar)
    finally:
        bar.close()
        run.close()
    summary["fsdp"] = run.fsdp
    if summary.get("interrupted"):
        if run.main:
            print(f"pretrain: stopped at step {run.state.step}; checkpoint saved, continue with --resume", file=sys.stderr)
        return summary
    run.save(final=True)
    summary["final"] = str(run.out / "final")
    w = recipe.quant_warmup.steps
    if recipe.quant == "bitnet" and run.state.step < w and run.main:
        from bitnet_train.training.quant_warmup import quant_lambda_at

        print(f"pretrain: warning: final/ was saved at step {run.state.step}, before the quantization warm-up's "
              f"{w} steps ended (the last step trained at quant_lambda {quant_lambda_at(run.state.step - 1, recipe.quant_warmup):.2f}); "
              "the checkpoint runs fully ternary everywhere (eval, export, transformers), as val_loss scored it: "
              "train past quant_warmup.steps, or shorten the warm-up", file=sys.stderr)
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
