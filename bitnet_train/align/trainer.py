"""TRL plumbing both stages share: the trainer arguments from a recipe, the callbacks (metrics.jsonl,
quantization warm-up, token count), checkpoints in our format, resume, and the final save."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bitnet_train.checkpoint.checkpointer import TRAINER_CHECKPOINT, saving, tensor_bytes
from bitnet_train.checkpoint.hf_trainer import with_our_checkpoint_format
from bitnet_train.errors import RecipeError, UserError
from bitnet_train.recipe import to_dict
from bitnet_train.training.quant_warmup import QuantWarmupConfig


def trainer_kwargs(recipe, out: Path, progress: bool) -> dict:
    import torch

    t = recipe.train
    report = "none"
    if recipe.wandb.enabled:
        from bitnet_train.training.metrics import wandb_mode

        try:
            import wandb  # noqa: F401
        except ImportError:
            raise RecipeError("wandb.enabled is true but wandb is not installed (pip install wandb)") from None
        os.environ["WANDB_PROJECT"] = recipe.wandb.project
        os.environ["WANDB_MODE"] = wandb_mode(recipe.wandb)
        os.environ.setdefault("WANDB_DIR", str(out))
        report = "wandb"
    has_eval = bool(recipe.data.eval_rows or recipe.data.eval_split)
    return dict(
        output_dir=str(out / "checkpoints"),
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.clip if t.clip > 0 else 0.0,
        max_length=t.max_length,
        logging_steps=t.log_every,
        save_strategy="steps",
        save_steps=t.save_every,
        save_total_limit=t.keep_last,
        eval_strategy="steps" if (has_eval and t.eval_every) else "no",
        eval_steps=t.eval_every or None,
        seed=recipe.seed,
        data_seed=recipe.seed,
        report_to=report,
        run_name=recipe.wandb.name,
        disable_tqdm=not progress,
        activation_checkpointing=t.activation_checkpointing,
        bf16=t.bf16,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        save_only_model=False,
    )


def _callbacks(recipe, out: Path, resume_step: int | None, counter):
    from transformers import TrainerCallback

    from bitnet_train.training.metrics import MetricsLog

    class MetricsCallback(TrainerCallback):
        """metrics.jsonl: one line per log (loss, lr, tokens, tokens/s, TRL's metrics)."""

        def __init__(self):
            self.m = None
            self.t0 = None
            self.tok0 = 0

        def on_train_begin(self, args, state, control, **kw):
            self.m = MetricsLog(out / "metrics.jsonl", keep_upto=resume_step)
            self.t0, self.tok0 = time.perf_counter(), counter.tokens

        def on_log(self, args, state, control, logs=None, **kw):
            if self.m is None or not logs:
                return
            rec = {"step": state.global_step}
            for k, v in logs.items():
                if isinstance(v, (int, float)):
                    rec[k] = v
            if "loss" in logs:
                now = time.perf_counter()
                dt = now - self.t0
                rec["tokens"] = counter.tokens
                rec["tokens_per_s"] = round((counter.tokens - self.tok0) / dt, 1) if dt > 0 else 0.0
                self.t0, self.tok0 = now, counter.tokens
            self.m.write(rec)

        def on_train_end(self, args, state, control, **kw):
            if self.m is not None:
                self.m.close()
                self.m = None

    return [quant_warmup_callback(recipe.quant_warmup), MetricsCallback()]


def quant_warmup_callback(cfg: QuantWarmupConfig):
    """A TrainerCallback that sets every BitLinear's quant_lambda for the optimizer step about to run
    (recipe key ``quant_warmup``, the same schedule as pretraining)."""
    from transformers import TrainerCallback

    from bitnet_train.training.quant_warmup import apply_warmup

    class QuantWarmupCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if model is not None:
                apply_warmup(model, state.global_step, cfg)

    return QuantWarmupCallback()


class _StopAfter:
    """For tests: save a checkpoint and stop after optimizer step ``n`` (like an interruption)."""

    def __new__(cls, n):
        from transformers import TrainerCallback

        class StopAfter(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= n:
                    control.should_save = True
                    control.should_training_stop = True

        return StopAfter()


class TokenCounter:
    """Wraps a data collator and counts the (non-padding) tokens of every batch it builds."""

    def __init__(self, collator):
        self.collator = collator
        self.tokens = 0

    def __call__(self, features):
        batch = self.collator(features)
        am = batch.get("attention_mask") if hasattr(batch, "get") else None
        if am is not None:
            self.tokens += int(am.sum())
        elif "input_ids" in batch:
            self.tokens += int(batch["input_ids"].numel())
        return batch


def summed_sft_trainer():
    from trl import SFTTrainer

    class BitNetSFTTrainer(with_our_checkpoint_format(SFTTrainer)):
        """SFTTrainer whose loss is the *sum* of the per-token losses of a micro-batch's trained tokens
        (the 2B4T report's "summation instead of mean") when ``sum_loss`` is set, and which
        distils from a teacher when ``distillation`` (a :class:`~bitnet_train.training.distill.Distillation`)
        is set: cross-entropy, KD and relations over the tokens the loss counts, normalised as
        TRL normalises its loss (by the accumulated batch's trained tokens)."""

        sum_loss = False
        distillation = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.sum_loss:
                # TRL divides the summed per-token loss by num_items_in_batch; 1 leaves the sum
                num_items_in_batch = 1
            if self.distillation is not None and model.training:
                loss = self._distilled_loss(model, inputs, num_items_in_batch)
                return (loss, None) if return_outputs else loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        def _distilled_loss(self, model, inputs, num_items_in_batch):
            d = self.distillation
            fw = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
            t_logits, t_qkv = d.teacher_forward(**fw, use_cache=False)
            logits, s_qkv = d.student_forward(model, **fw, use_cache=False)
            labels = inputs["labels"][:, 1:]
            counted = labels != -100
            n_here = counted.sum()
            n = num_items_in_batch if num_items_in_batch is not None else n_here
            s_rows, t_rows = logits[:, :-1][counted], t_logits[:, :-1][counted]
            share = n_here / n  # this micro-batch's part of the accumulated batch's trained tokens
            loss, parts = d.loss(s_rows, t_rows, labels[counted], s_qkv, t_qkv, divisor=n, rel_scale=share,
                                 attention_mask=fw.get("attention_mask"))
            for k, v in {**parts, **d.step_stats()}.items():
                self._metrics["train"][k].append(float(v))
            return loss

    return BitNetSFTTrainer


def _finish(trainer, tok, recipe, out: Path, stage: str, counter, t_start: float, result) -> dict:
    from bitnet_train.checkpoint.format import save_checkpoint

    model = trainer.model
    if hasattr(model, "module"):
        model = model.module
    step = trainer.state.global_step
    recipe_dict = to_dict(recipe)
    with saving(out / "final", out, tensor_bytes(model.state_dict()), TRAINER_CHECKPOINT):
        final = save_checkpoint(model, out / "final", tokenizer=tok,
                                extra={"stage": stage, "step": step, "recipe": recipe_dict})
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    dt = time.perf_counter() - t_start
    return {
        "step": step,
        "loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
        "tokens": counter.tokens,
        "tokens_per_s": counter.tokens / dt if dt > 0 else 0.0,
        "final": str(final),
        "train_runtime": getattr(result, "metrics", {}).get("train_runtime") if result is not None else None,
    }


def require_trl():
    try:
        import trl  # noqa: F401
    except ImportError:
        raise UserError("sft and dpo need TRL: pip install 'bitnet-train[align]'") from None


def quiet_hf():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def train_stage(trainer, recipe, out: Path, stage: str, tok, last, resume_step, stop_after: int | None) -> dict:
    """The part both stages share: count tokens, add our callbacks, train (or resume), save final/."""
    out.mkdir(parents=True, exist_ok=True)  # only now: bad data or a bad model leaves no directory
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    for cb in _callbacks(recipe, out, resume_step, counter):
        trainer.add_callback(cb)
    if stop_after is not None:
        trainer.add_callback(_StopAfter(stop_after))
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(last) if last is not None else None)
    if stop_after is not None and trainer.state.global_step < (recipe.train.max_steps or 10**12):
        return {"step": trainer.state.global_step, "interrupted": True}
    return _finish(trainer, tok, recipe, out, stage, counter, t0, result)
