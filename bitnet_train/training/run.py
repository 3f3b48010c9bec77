"""A pretraining run as one object. :class:`Run` holds everything the loop reads — the recipe, the
Accelerator, the tokenizer, the model, the optimizer, the objective (the loss; with a teacher when
the recipe distills), the training blocks, the state, the evaluator, the checkpointer and the
metrics log — and :func:`open_run` builds it, fresh or from the newest checkpoint. The model of a
run is built in one place, :func:`build_model`; its tokenizer in one, :func:`run_tokenizer`.

The loop (:mod:`bitnet_train.training.loop`) only reads a Run; the recipe schema and the command are
:mod:`bitnet_train.training.pretrain`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bitnet_train.checkpoint.checkpointer import Checkpointer, TrainState
from bitnet_train.errors import RecipeError
from bitnet_train.training.loop import Evaluator


@dataclass
class Run:
    recipe: Any  # a PretrainRecipe
    acc: Any  # the accelerate Accelerator: device, ranks, collectives
    out: Path  # the recipe's output_dir
    tok: Any
    model: Any  # prepared by accelerate (DDP) or sharded with FSDP2
    opt: Any
    objective: Any  # (model, batch) -> (loss, parts): :class:`~bitnet_train.training.distill.TokenLoss` or a Distillation
    blocks: Iterator  # this rank's training blocks, from state.data_position on
    state: TrainState
    evaluate: Evaluator
    checkpointer: Checkpointer
    resumed_from: Path | None  # the checkpoint this run continues from; None for a fresh run
    fsdp: bool
    metrics: Any = None  # the MetricsLog (main process only)
    wandb: Any = None

    @property
    def fresh(self) -> bool:
        return self.resumed_from is None

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def log(self, rec: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(rec)

    def save(self, final: bool = False) -> Path:
        """A checkpoint (every rank calls it), the loss plot, and the ranks synchronised."""
        from bitnet_train.training.metrics import plot_loss

        path = self.checkpointer.save(self.model, self.opt, self.state, final=final)
        if self.main:
            plot_loss(self.out / "metrics.jsonl", self.out / "loss.png")
        self.acc.wait_for_everyone()
        return path

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.wandb.finish()
            self.metrics = None


# ----------------------------------------------------------------------------- the accelerator


def mixed_precision(t) -> str:
    import torch

    mp = t.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    return mp


def make_accelerator(t):
    """The Accelerator: process group, device, backward and the loop's collectives. Under FSDP
    (:func:`bitnet_train.training.distributed.fsdp_requested`) the model is sharded by us, not by
    ``prepare``, so accelerate gets neither mixed precision (FSDP2's policy does it) nor dynamo."""
    import torch
    from accelerate import Accelerator

    from bitnet_train.training.distributed import fsdp_requested

    mp = mixed_precision(t)
    if fsdp_requested():
        mp, dynamo = "no", None
    else:
        dynamo = "inductor" if t.compile else None
    # cpu=True without CUDA: several launched processes then form a gloo group (MULTI_CPU) instead
    # of each training alone
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available(), dynamo_backend=dynamo)


def reset_accelerate(acc) -> None:
    """Forget the Accelerator's process-wide settings (mixed precision, dynamo) after a
    single-process run, so that the next pretrain() in this process may choose others."""
    from accelerate.state import AcceleratorState

    if acc.num_processes == 1:
        AcceleratorState._reset_state()


def _use_fsdp() -> bool:
    """FSDP2 when the launch asks for it and its process group is up (one launched process too)."""
    import torch.distributed as dist

    from bitnet_train.training.distributed import fsdp_requested

    return fsdp_requested() and dist.is_available() and dist.is_initialized()


# ----------------------------------------------------------------------------- tokenizer and model


def run_tokenizer(recipe, acc, out: Path, ck: Path | None):
    """The run's tokenizer: a resumed run's from its checkpoint; a fresh run's from the recipe
    (:func:`bitnet_train.data.config.make_tokenizer`). With several processes the main one makes it
    (a BPE trained on the data, or a download) and the others read its copy."""
    from bitnet_train.data.config import make_tokenizer
    from bitnet_train.data.tokenizer import load_tokenizer

    if ck is not None:
        return load_tokenizer(ck)
    if acc.num_processes == 1:
        return make_tokenizer(recipe.data, recipe.model)
    from bitnet_train.fsutil import atomic_dir

    shared = out / "tokenizer"
    if acc.is_main_process:
        tok = make_tokenizer(recipe.data, recipe.model)
        with atomic_dir(shared) as tmp:
            tok.save_pretrained(tmp)
    acc.wait_for_everyone()
    return tok if acc.is_main_process else load_tokenizer(shared)


def build_model(recipe, tok, device, fsdp: bool, ck: Path | None = None):
    """The run's model, float32 on ``device``, sharded with FSDP2 when ``fsdp``: the recipe's
    ``model:`` (:func:`bitnet_train.modeling.models.load_model`) for a fresh run, else checkpoint ``ck``.

    A preset, and a sharded (``dcp/``) checkpoint, are built on the meta device and materialized
    per rank (:func:`bitnet_train.training.distributed.materialize`: the same weights at any world size,
    each rank allocating only its shard; a sharded checkpoint's weights are read later with the
    optimizer, :meth:`~bitnet_train.checkpoint.checkpointer.Checkpointer.prepare`). A whole checkpoint or an
    ``hf:`` model is read whole, then sharded."""
    import torch

    from bitnet_train.checkpoint.format import load_checkpoint
    from bitnet_train.checkpoint.sharded import DCP_DIR
    from bitnet_train.training.distributed import materialize, shard_model
    from bitnet_train.modeling.models import load_model, model_kind

    if ck is None:
        on_meta = model_kind(recipe.model) == "preset"
        model = load_model(recipe.model, quant=recipe.quant, convert=recipe.convert, tokenizer=tok,
                           seed=recipe.seed, device="meta" if on_meta else None)
        maxpos = getattr(model.config, "max_position_embeddings", None)
        if maxpos and recipe.data.seq_len > maxpos:
            raise RecipeError(f"data.seq_len {recipe.data.seq_len} exceeds the model's max_position_embeddings {maxpos}")
        params = True
    else:
        on_meta = (Path(ck) / DCP_DIR).is_dir()
        model = load_checkpoint(ck, device="meta" if on_meta else None)
        params = False
    model = model.to(torch.float32)
    if not on_meta:
        model.to(device)
    t = recipe.train
    if t.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if fsdp:
        if t.compile:  # accelerate compiles what it prepares; under FSDP each decoder layer is compiled in place
            for layer in model.model.layers:
                layer.compile(backend="inductor")
        shard_model(model, mixed_precision(t))
    if on_meta:
        materialize(model, recipe.seed, device, params=params)
    return model


# ----------------------------------------------------------------------------- the run


def open_run(recipe, resume: bool, acc) -> Run:
    """Set a run up, fresh or from the newest checkpoint in ``output_dir`` (``resume``): the
    tokenizer, the model, the optimizer (restored with the RNGs), the objective, the data at its
    saved position, validation, the metrics log and wandb."""
    from bitnet_train.checkpoint.checkpointer import check_resume_recipe, resume_point, seed_all
    from bitnet_train.data.config import open_training_data
    from bitnet_train.training.distill import make_objective
    from bitnet_train.fsutil import clean_stale
    from bitnet_train.training.metrics import MetricsLog, WandbLogger
    from bitnet_train.training.optim import build_optimizer, init_adamw_state
    from bitnet_train.recipe import resume_rules, to_dict
    from bitnet_train.data.stream import HeldOut

    out, t = Path(recipe.output_dir), recipe.train
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    start = resume_point(out, resume, "pretrain", announce=main)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        clean_stale(out / "checkpoints")  # directories a process killed while saving left behind
        clean_stale(out)  # and an interrupted overwrite of final/ (its previous copy comes back)
    ck = start[1] if start is not None else None
    recipe_dict = to_dict(recipe)

    if ck is None:
        seed_all(recipe.seed)
        state = TrainState()
    else:
        changed = check_resume_recipe(ck, recipe_dict, resume_rules(type(recipe)))
        if changed and main:
            print(f"pretrain: resuming with changed schedule keys ({'; '.join(changed)})", file=sys.stderr)
        state = TrainState.read(ck)
    fsdp = _use_fsdp()
    tok = run_tokenizer(recipe, acc, out, ck)
    model = build_model(recipe, tok, acc.device, fsdp, ck)
    model.train()
    # the teacher is read from the recipe on every start (never checkpointed), before the student is wrapped
    objective = make_objective(recipe, model, tok, acc.device, announce=main)

    ckpt = Checkpointer(out, acc, tok, recipe_dict, t.keep_last, fsdp=fsdp)
    opt = build_optimizer(model, t.lr, t.weight_decay)
    model, opt = ckpt.prepare(model, opt, ck)
    if ck is None:
        init_adamw_state(opt)  # before the first forward, as a resumed run's (bitnet_train/training/optim.py)

    data = open_training_data(recipe.data, tok, recipe.seed, rank=rank, world_size=world)
    # the same validation windows at any world size: the first eval_batches global batches, one share per rank
    val = data.validation() if t.eval_batches else None
    evaluate = Evaluator(val or HeldOut([], None, 0, 0), t.batch_size, acc, limit=t.eval_batches * t.batch_size * world)
    run = Run(recipe=recipe, acc=acc, out=out, tok=tok, model=model, opt=opt, objective=objective,
              blocks=data.train_blocks(state.data_position), state=state, evaluate=evaluate, checkpointer=ckpt,
              resumed_from=ck, fsdp=fsdp)
    if main:
        run.wandb = WandbLogger(recipe.wandb, out, recipe_dict, None if ck is None else state.step)
        run.metrics = MetricsLog(out / "metrics.jsonl", keep_upto=None if ck is None else state.step, sink=run.wandb)
    return run
