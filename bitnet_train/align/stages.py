"""The two stages, ``sft`` and ``dpo`` (TRL's ``SFTTrainer`` / ``DPOTrainer``), and their command line."""

from __future__ import annotations

from pathlib import Path

from bitnet_train.errors import RecipeError
from bitnet_train.align.data import stage_datasets, prepare_dpo_rows, prepare_sft_rows
from bitnet_train.align.models import load_align_tokenizer, load_policy, load_reference
from bitnet_train.align.recipes import DPORecipe, SFTRecipe, load_dpo_recipe, load_sft_recipe
from bitnet_train.align.trainer import quiet_hf, require_trl, summed_sft_trainer, train_stage, trainer_kwargs
from bitnet_train.checkpoint.hf_trainer import trainer_resume_point, with_our_checkpoint_format


def _setup(recipe, resume: bool, stage: str):
    """What SFT and DPO start the same way: TRL present, the output directory and its resume point,
    the seed, the tokenizer and the policy model (nothing is written yet). Returns (out, last checkpoint, its step, tok, model)."""
    import torch

    require_trl()
    quiet_hf()
    out = Path(recipe.output_dir)
    last, resume_step = trainer_resume_point(out, resume, stage)
    torch.manual_seed(recipe.seed)
    tok = load_align_tokenizer(recipe)
    return out, last, resume_step, tok, load_policy(recipe.model)


def sft(recipe: SFTRecipe, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) an SFT recipe with TRL's SFTTrainer. Returns a summary dict."""
    from bitnet_train.fsutil import owned

    with owned(recipe.output_dir, "sft"):  # a second run into the same output_dir is refused
        return _sft(recipe, resume, progress, stop_after)


def _sft(recipe: SFTRecipe, resume: bool, progress: bool, stop_after: int | None) -> dict:
    out, last, resume_step, tok, model = _setup(recipe, resume, "sft")  # checks TRL is installed
    import torch
    from trl import SFTConfig

    from bitnet_train.training.distill import Distillation, make_objective

    train_ds, eval_ds = stage_datasets(recipe, prepare_sft_rows)
    kind = prepare_sft_rows(train_ds.select(range(1)), "data")[1]
    t = recipe.train
    args = SFTConfig(
        **trainer_kwargs(recipe, out, progress),
        packing=t.packing,
        assistant_only_loss=kind == "conversational",
        completion_only_loss=True if kind == "prompt-completion" else None,
        dataset_num_proc=None,
    )
    cls = summed_sft_trainer()
    objective = make_objective(recipe, model, tok, "cuda" if torch.cuda.is_available() else "cpu", stage="sft")
    try:
        trainer = cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok)
    except (ValueError, RuntimeError) as e:
        raise RecipeError(f"sft: TRL rejected the setup: {str(e).splitlines()[0]}") from None
    trainer.sum_loss = t.loss_reduction == "sum"
    trainer.distillation = objective if isinstance(objective, Distillation) else None
    return train_stage(trainer, recipe, out, "sft", tok, last, resume_step, stop_after)


def dpo(recipe: DPORecipe, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) a DPO recipe with TRL's DPOTrainer and an explicit quantized reference model."""
    from bitnet_train.fsutil import owned

    with owned(recipe.output_dir, "dpo"):  # a second run into the same output_dir is refused
        return _dpo(recipe, resume, progress, stop_after)


def _dpo(recipe: DPORecipe, resume: bool, progress: bool, stop_after: int | None) -> dict:
    out, last, resume_step, tok, model = _setup(recipe, resume, "dpo")  # checks TRL is installed
    from trl import DPOConfig, DPOTrainer

    ref = load_reference(recipe.ref_model or recipe.model)
    train_ds, eval_ds = stage_datasets(recipe, prepare_dpo_rows)
    t = recipe.train
    args = DPOConfig(
        **trainer_kwargs(recipe, out, progress),
        beta=t.beta,
        loss_type=[t.loss_type],
        precompute_ref_log_probs=t.precompute_ref_log_probs,
        dataset_num_proc=None,
    )
    cls = with_our_checkpoint_format(DPOTrainer)
    try:
        trainer = cls(model=model, ref_model=ref, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tok)
    except (ValueError, RuntimeError) as e:
        raise RecipeError(f"dpo: TRL rejected the setup: {str(e).splitlines()[0]}") from None
    return train_stage(trainer, recipe, out, "dpo", tok, last, resume_step, stop_after)


# ----------------------------------------------------------------------------- CLI


def register(sub) -> None:
    for name, helptext in (("sft", "supervised fine-tuning of a BitNet checkpoint (TRL SFTTrainer)"),
                           ("dpo", "direct preference optimisation of a BitNet checkpoint (TRL DPOTrainer)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("recipe", help=f"recipe YAML (see recipes/{name}-tiny.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a recipe key, e.g. --set train.lr=1e-4 (repeatable)")
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.set_defaults(func=cmd_align, stage=name)


def cmd_align(args) -> int:
    if args.stage == "sft":
        recipe = load_sft_recipe(args.recipe, args.overrides)
        s = sft(recipe, resume=args.resume, progress=not args.no_progress)
    else:
        recipe = load_dpo_recipe(args.recipe, args.overrides)
        s = dpo(recipe, resume=args.resume, progress=not args.no_progress)
    f = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"{args.stage}: {s['step']} steps, {s['tokens']:,} tokens ({s['tokens_per_s']:,.0f} tokens/s), "
          f"loss {f(s['first_loss'])} -> {f(s['loss'])}; model in {s['final']}")
    return 0
