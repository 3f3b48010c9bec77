"""``bitnet-train sft RECIPE.yaml`` and ``bitnet-train dpo RECIPE.yaml``: alignment through TRL.

Both stages run TRL's own trainers (``SFTTrainer`` / ``DPOTrainer`` with ``SFTConfig`` /
``DPOConfig``) on a BitNet model whose linear layers stay :class:`~bitnet_train.bitlinear.BitLinear`
(ternary weights, 8-bit activations, straight-through estimator) throughout. DPO's frozen
reference model is a second, independent load of the same checkpoint: its log-probabilities come
from the same quantized forward.

Output directory (the same layout as pretraining)::

    OUTPUT_DIR/metrics.jsonl              one line per logged step (loss, lr, tokens/s, DPO rewards...)
    OUTPUT_DIR/checkpoints/checkpoint-N/  TRL/Trainer checkpoints (model in our format + optimizer,
                                          scheduler, RNG and trainer state): ``--resume`` continues
                                          from the newest one
    OUTPUT_DIR/final/                     the model, tokenizer and chat template, written by
                                          checkpoint.save_checkpoint: ``final/`` of SFT feeds DPO,
                                          ``final/`` of DPO feeds the exporters

Defaults named "2B4T" come from the BitNet b1.58 2B4T technical report: SFT with a summed rather
than averaged loss; DPO with beta 0.1, learning rate 2e-7 and 2 epochs.
"""

from __future__ import annotations

import glob as _glob
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AlignDataError, CheckpointError, RecipeError, UserError
from .checkpointer import STATE_FILE, TRAINER_CHECKPOINT, list_checkpoints, resume_point
from .recipe import load_recipe, to_dict
from .warmup import QuantWarmupConfig


# ----------------------------------------------------------------------------- recipe schemas


@dataclass
class AlignDataConfig:
    path: str = field(metadata={"help": "local .jsonl/.json/.parquet/.csv file, glob, or hub dataset name"})
    split: str = field(default="train", metadata={"help": "split to train on (hub datasets: e.g. train_sft)"})
    name: str | None = field(default=None, metadata={"help": "hub dataset configuration name"})
    eval_split: str | None = field(default=None, metadata={"help": "split evaluated every train.eval_every steps"})
    eval_rows: int = field(default=0, metadata={"min": 0, "help": "hold out this many training rows for evaluation"})
    max_rows: int | None = field(default=None, metadata={"min": 1, "help": "use only the first N training rows"})


@dataclass
class AlignTrainConfig:
    max_steps: int = field(default=0, metadata={"min": 0, "help": "optimizer steps; 0 = run train.epochs"})
    epochs: float = field(default=1.0, metadata={"min": 0.0, "help": "passes over the data when max_steps is 0"})
    batch_size: int = field(default=8, metadata={"min": 1, "help": "rows per micro-batch (DPO: preference pairs)"})
    grad_accum: int = field(default=1, metadata={"min": 1, "help": "micro-batches per optimizer step"})
    lr: float = field(default=2e-5, metadata={"min": 0.0, "help": "peak learning rate"})
    lr_scheduler: str = field(default="cosine", metadata={"choices": ("cosine", "linear", "constant", "constant_with_warmup"),
                                                          "help": "transformers lr_scheduler_type"})
    warmup_steps: int = field(default=0, metadata={"min": 0, "help": "linear LR warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0, "help": "AdamW weight decay"})
    clip: float = field(default=1.0, metadata={"min": 0.0, "help": "gradient-norm clip; 0 = off"})
    max_length: int | None = field(default=1024, metadata={"min": 1, "help": "truncate sequences to this many tokens"})
    save_every: int = field(default=500, metadata={"min": 1, "help": "checkpoint every N optimizer steps"})
    keep_last: int = field(default=2, metadata={"min": 1, "help": "checkpoints kept"})
    eval_every: int = field(default=0, metadata={"min": 0, "help": "evaluate every N steps (needs eval data); 0 = off"})
    log_every: int = field(default=1, metadata={"min": 1, "help": "write metrics.jsonl every N steps"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (GPU)"})


@dataclass
class SFTTrainConfig(AlignTrainConfig):
    loss_reduction: str = field(
        default="sum",
        metadata={"choices": ("sum", "mean"),
                  "help": "sum (2B4T report) or mean of the per-token loss over a micro-batch's trained tokens"},
    )
    packing: bool = field(default=False, metadata={"help": "pack several examples per sequence (TRL bfd)"})


@dataclass
class DPOTrainConfig(AlignTrainConfig):
    lr: float = field(default=2e-7, metadata={"min": 0.0, "help": "peak learning rate (2B4T: 2e-7)"})
    epochs: float = field(default=2.0, metadata={"min": 0.0, "help": "passes over the data (2B4T: 2)"})
    beta: float = field(default=0.1, metadata={"min": 0.0, "help": "DPO beta (2B4T: 0.1)"})
    loss_type: str = field(default="sigmoid", metadata={"choices": ("sigmoid", "ipo", "hinge", "robust"),
                                                        "help": "TRL DPO loss"})
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "compute the reference log-probs once before training, then free the reference"})


@dataclass
class _WandbCfg:
    enabled: bool = field(default=False, metadata={"help": "log metrics to Weights & Biases (through TRL's report_to)"})
    project: str = field(default="bitnet-train", metadata={"help": "wandb project"})
    name: str | None = field(default=None, metadata={"help": "run name (default: wandb's)"})
    mode: str | None = field(default=None, metadata={"choices": ("online", "offline", "disabled"),
                                                     "help": "default: $WANDB_MODE, else online with credentials"})


_CHAT_TEMPLATE_HELP = ("null = the tokenizer's (bitnet-train's default when it has none); 'default'; "
                       "a .jinja file; or the Jinja text itself")


@dataclass
class SFTRecipe:
    output_dir: str = field(metadata={"help": "where metrics, checkpoints and final/ go"})
    model: str = field(metadata={"help": "checkpoint directory (pretraining final/ or step-*), or hf:<model>"})
    data: AlignDataConfig
    train: SFTTrainConfig
    seed: int = field(default=0, metadata={"help": "seeds data order and torch"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer dir or hub name (default: the model's)"})
    chat_template: str | None = field(default=None, metadata={"help": _CHAT_TEMPLATE_HELP})
    quant_warmup: QuantWarmupConfig = field(default_factory=QuantWarmupConfig)
    wandb: _WandbCfg = field(default_factory=_WandbCfg)


@dataclass
class DPORecipe:
    output_dir: str = field(metadata={"help": "where metrics, checkpoints and final/ go"})
    model: str = field(metadata={"help": "checkpoint directory (usually SFT's final/), or hf:<model>"})
    data: AlignDataConfig
    train: DPOTrainConfig
    seed: int = field(default=0, metadata={"help": "seeds data order and torch"})
    ref_model: str | None = field(default=None, metadata={"help": "reference checkpoint (default: the same as model)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer dir or hub name (default: the model's)"})
    chat_template: str | None = field(default=None, metadata={"help": _CHAT_TEMPLATE_HELP})
    quant_warmup: QuantWarmupConfig = field(default_factory=QuantWarmupConfig)
    wandb: _WandbCfg = field(default_factory=_WandbCfg)


def load_sft_recipe(path, overrides=None) -> SFTRecipe:
    return load_recipe(SFTRecipe, path, overrides)


def load_dpo_recipe(path, overrides=None) -> DPORecipe:
    return load_recipe(DPORecipe, path, overrides)


# ----------------------------------------------------------------------------- model and tokenizer


def load_policy(spec: str, what: str = "model"):
    """A checkpoint (ours, converted HF, 2B4T bf16 layout) or ``hf:<model>`` (see
    :func:`bitnet_train.model.load_model`) as a BitNet model with BitLinear layers, in float32;
    errors name the key and the problem."""
    import torch

    from .bitlinear import bitlinear_modules
    from .model import load_model

    try:
        model = load_model(spec, checkpoint_only=True, what=what)
    except CheckpointError as e:
        raise RecipeError(f"{what}: {e}") from None
    if not bitlinear_modules(model):
        raise RecipeError(
            f"{what}: {spec!r} has no ternary (BitLinear) layers; align a BitNet checkpoint, "
            "or convert a full-precision model with model: hf:<dir or hub id>"
        )
    return model.to(torch.float32)


def _tokenizer_source(recipe) -> str:
    if recipe.tokenizer:
        return recipe.tokenizer
    spec = recipe.model
    return spec[3:] if spec.startswith("hf:") else spec


def load_align_tokenizer(recipe):
    """The tokenizer (the model directory's by default) with pad token and the recipe's chat template."""
    from transformers import AutoTokenizer

    from .tokenizer import DEFAULT_CHAT_TEMPLATE, ensure_special_tokens

    src = _tokenizer_source(recipe)
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise RecipeError(
            f"tokenizer: cannot load a tokenizer from {src!r} ({str(e).splitlines()[0]}); set the tokenizer key"
        ) from None
    ct = recipe.chat_template
    if ct is not None:
        if ct == "default":
            tok.chat_template = DEFAULT_CHAT_TEMPLATE
        elif ct.endswith((".jinja", ".j2", ".txt")) and "{" not in ct:
            p = Path(ct)
            if not p.is_file():
                raise RecipeError(f"chat_template: file {ct!r} does not exist")
            tok.chat_template = p.read_text(encoding="utf-8")
        else:
            tok.chat_template = ct
    ensure_special_tokens(tok)
    if tok.eos_token is None:
        raise RecipeError(f"tokenizer {src!r} has no EOS token; the model could not learn to stop")
    check_chat_template(tok)
    return tok


def check_chat_template(tok) -> None:
    """Render a probe conversation; the assistant's text must come out of the template."""
    probe = [{"role": "user", "content": "PROBE_USER_7f3"}, {"role": "assistant", "content": "PROBE_ASSISTANT_9c1"}]
    try:
        text = tok.apply_chat_template(probe, tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja raises many kinds
        raise RecipeError(f"chat_template: cannot render a user/assistant conversation: {e}") from None
    if "PROBE_ASSISTANT_9c1" not in text:
        raise RecipeError(
            "chat_template: the template renders no assistant turn (a user+assistant conversation came out as "
            f"{text[:120]!r}); give a template that writes assistant messages, e.g. chat_template: default"
        )


# ----------------------------------------------------------------------------- data


_EXT = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(cfg: AlignDataConfig, split: str | None = None):
    """A ``datasets.Dataset`` from a local file/glob or a hub dataset."""
    from datasets import load_dataset

    split = split or cfg.split
    path = cfg.path
    local = [path] if Path(path).is_file() else sorted(_glob.glob(path)) if any(c in path for c in "*?[") else []
    if local:
        exts = {Path(p).suffix for p in local}
        if len(exts) != 1 or next(iter(exts)) not in _EXT:
            raise AlignDataError(f"data.path: {path!r}: files must all be one of {', '.join(_EXT)} (got {sorted(exts)})")
        if _EXT[next(iter(exts))] == "json":
            for f in local:
                _check_json_rows(Path(f))
        try:
            ds = load_dataset(_EXT[next(iter(exts))], data_files=local, split="train")
        except Exception as e:  # noqa: BLE001 - datasets wraps parser errors in DatasetGenerationError
            cause = e.__cause__ or e
            raise AlignDataError(f"data.path: cannot read {', '.join(local)}: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}") from None
    elif Path(path).suffix in _EXT or any(c in path for c in "*?[") or path.startswith((".", "/")):
        raise AlignDataError(f"data.path: no file matches {path!r}")
    else:
        try:
            ds = load_dataset(path, cfg.name, split=split)
        except Exception as e:  # noqa: BLE001 - hub / builder errors of many kinds
            raise AlignDataError(f"data.path: cannot load dataset {path!r} split {split!r}: {str(e).splitlines()[0]}") from None
    if cfg.max_rows is not None and split == cfg.split:
        ds = ds.select(range(min(cfg.max_rows, len(ds))))
    if len(ds) == 0:
        raise AlignDataError(f"data.path: {path!r} has no rows")
    return ds


def _check_json_rows(f: Path) -> None:
    """Every row of a .jsonl (or JSON-lines .json) file is a JSON object: the first bad line is
    named, as ``FILE:LINE``, before datasets sees the file."""
    if f.suffix == ".json":
        try:
            with open(f, encoding="utf-8") as fh:
                whole = json.load(fh)
            if isinstance(whole, (list, dict)):
                return  # one JSON document (a list of rows, or columns): datasets reads it
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # maybe JSON lines: checked line by line below
    try:
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise AlignDataError(f"{f}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise AlignDataError(f"{f}:{lineno}: expected a JSON object (one row), got {type(row).__name__}")
    except UnicodeDecodeError as e:
        raise AlignDataError(f"{f}: not valid UTF-8: {e.reason}") from None


def _is_messages(v) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in v)


def prepare_sft_rows(ds, where: str):
    """Keep ``messages`` (conversational) or ``prompt``/``completion``; check every row."""
    cols = set(ds.column_names)
    if "messages" in cols:
        ds = ds.select_columns(["messages"])

        def check(row, i):
            m = row["messages"]
            if not _is_messages(m):
                raise AlignDataError(f"{where}: row {i}: 'messages' must be a list of {{role, content}} mappings")
            if not any(x["role"] == "assistant" for x in m):
                raise AlignDataError(f"{where}: row {i}: 'messages' has no assistant message to train on")
        kind = "conversational"
    elif {"prompt", "completion"} <= cols:
        ds = ds.select_columns(["prompt", "completion"])

        def check(row, i):
            for k in ("prompt", "completion"):
                v = row[k]
                if not (isinstance(v, str) or _is_messages(v)) or (isinstance(v, str) and k == "completion" and not v):
                    raise AlignDataError(f"{where}: row {i}: '{k}' must be a non-empty string or a list of messages")
        kind = "prompt-completion"
    else:
        raise AlignDataError(
            f"{where}: SFT data needs a 'messages' column or 'prompt' and 'completion' columns; found {sorted(cols)}"
        )
    for i, row in enumerate(ds):
        check(row, i)
    return ds, kind


def prepare_dpo_rows(ds, where: str):
    """Keep ``prompt``/``chosen``/``rejected`` (strings or message lists); check every row.

    A conversational ``chosen``/``rejected`` that repeats a string ``prompt`` as its first user turn
    (HuggingFaceH4/ultrafeedback_binarized) is turned into an implicit prompt for TRL to extract."""
    cols = set(ds.column_names)
    missing = [c for c in ("chosen", "rejected") if c not in cols]
    if missing:
        raise AlignDataError(f"{where}: DPO data needs columns prompt, chosen, rejected; missing {', '.join(missing)} (found {sorted(cols)})")
    keep = [c for c in ("prompt", "chosen", "rejected") if c in cols]
    ds = ds.select_columns(keep)
    first = ds[0]
    if "prompt" not in cols and not _is_messages(first["chosen"]):
        raise AlignDataError(f"{where}: DPO data needs a 'prompt' column (or chosen/rejected as message lists that hold it)")
    for i, row in enumerate(ds):
        for k in keep:
            v = row[k]
            if v is None or (isinstance(v, str) and k != "prompt" and not v.strip()) or (isinstance(v, list) and not v):
                raise AlignDataError(f"{where}: row {i}: '{k}' is missing or empty")
            if not (isinstance(v, str) or _is_messages(v)):
                raise AlignDataError(f"{where}: row {i}: '{k}' must be a string or a list of {{role, content}} mappings")
        if isinstance(row["chosen"], str) != isinstance(row["rejected"], str):
            raise AlignDataError(f"{where}: row {i}: 'chosen' and 'rejected' must both be strings or both message lists")
    if "prompt" in keep and isinstance(first["prompt"], str) and _is_messages(first["chosen"]):
        def fix(row):
            c, r, p = row["chosen"], row["rejected"], row["prompt"]
            if c and c[0]["role"] == "user" and c[0]["content"] == p and r and r[0]["content"] == p:
                return {"chosen": c, "rejected": r}
            return {"chosen": [{"role": "user", "content": p}] + c, "rejected": [{"role": "user", "content": p}] + r}

        ds = ds.map(fix, remove_columns=["prompt"])
    return ds


def _split_eval(ds, cfg: AlignDataConfig, seed: int):
    if cfg.eval_rows:
        if cfg.eval_rows >= len(ds):
            raise AlignDataError(f"data.eval_rows {cfg.eval_rows} leaves no training rows (the data has {len(ds)})")
        parts = ds.train_test_split(test_size=cfg.eval_rows, seed=seed, shuffle=True)
        return parts["train"], parts["test"]
    return ds, None


def _datasets(recipe, prepare):
    cfg = recipe.data
    ds = prepare(load_rows(cfg), f"data.path {cfg.path!r}")
    ds = ds[0] if isinstance(ds, tuple) else ds
    train, ev = _split_eval(ds, cfg, recipe.seed)
    if cfg.eval_split:
        ev = prepare(load_rows(cfg, cfg.eval_split), f"data.eval_split {cfg.eval_split!r}")
        ev = ev[0] if isinstance(ev, tuple) else ev
    return train, ev


# ----------------------------------------------------------------------------- trainer plumbing


def _trainer_kwargs(recipe, out: Path, progress: bool) -> dict:
    import torch

    t = recipe.train
    report = "none"
    if recipe.wandb.enabled:
        from .metrics import wandb_mode

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
        activation_checkpointing=t.gradient_checkpointing,
        bf16=t.bf16,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        save_only_model=False,
    )


def _callbacks(recipe, out: Path, resume_step: int | None, counter):
    from transformers import TrainerCallback

    from .metrics import MetricsLog

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

    from .warmup import apply_warmup

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


def _patch_checkpoint_config(model, ck_dir: Path) -> None:
    """Trainer checkpoints hold the weights written by save_pretrained; put our quantization_config
    into their config.json so that they load (here and in stock transformers) as ternary models."""
    from .checkpoint import bit_backend, quantization_config_for

    f = ck_dir / "config.json"
    if not f.is_file():
        return
    cfg = json.loads(f.read_text())
    qc = quantization_config_for(model)
    if qc:
        cfg["quantization_config"] = qc
        meta = dict(cfg.get("bitnet_train") or {})
        meta.update(quant="bitnet", backend=bit_backend(model))
        cfg["bitnet_train"] = meta
    f.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _our_format_mixin(base):
    class _Trainer(base):
        def _save(self, output_dir=None, state_dict=None):
            super()._save(output_dir, state_dict)
            _patch_checkpoint_config(self.model, Path(output_dir or self.args.output_dir))

    _Trainer.__name__ = base.__name__
    return _Trainer


def _summed_sft_trainer():
    from trl import SFTTrainer

    class BitNetSFTTrainer(_our_format_mixin(SFTTrainer)):
        """SFTTrainer whose loss is the *sum* of the per-token losses of a micro-batch's trained tokens
        (the 2B4T report's "summation instead of mean") when ``sum_loss`` is set."""

        sum_loss = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.sum_loss:
                # TRL divides the summed per-token loss by num_items_in_batch; 1 leaves the sum
                num_items_in_batch = 1
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    return BitNetSFTTrainer


def latest_trainer_checkpoint(out: Path) -> Path | None:
    """The newest complete Trainer checkpoint (``checkpoints/checkpoint-N``) in ``out``, or None."""
    found = list_checkpoints(out, TRAINER_CHECKPOINT)
    return found[-1][1] if found else None


def _resume_point(out: Path, resume: bool, stage: str):
    last = resume_point(out, resume, stage, TRAINER_CHECKPOINT)
    if last is None:
        return None, None
    return last[1], json.loads((last[1] / STATE_FILE).read_text())["global_step"]


def _finish(trainer, tok, recipe, out: Path, stage: str, counter, t_start: float, result) -> dict:
    from .checkpoint import save_checkpoint

    model = trainer.model
    if hasattr(model, "module"):
        model = model.module
    step = trainer.state.global_step
    recipe_dict = to_dict(recipe)
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


def _require_trl():
    try:
        import trl  # noqa: F401
    except ImportError:
        raise UserError("sft and dpo need TRL: pip install 'bitnet-train[align]'") from None


def _quiet_hf():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


# ----------------------------------------------------------------------------- the stages


def _train(trainer, recipe, out: Path, stage: str, tok, last, resume_step, stop_after: int | None) -> dict:
    """The part both stages share: count tokens, add our callbacks, train (or resume), save final/."""
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


def _setup(recipe, resume: bool, stage: str):
    """What SFT and DPO start the same way: TRL present, the output directory and its resume point,
    the seed, the tokenizer and the policy model. Returns (out, last checkpoint, its step, tok, model)."""
    import torch

    _require_trl()
    _quiet_hf()
    out = Path(recipe.output_dir)
    last, resume_step = _resume_point(out, resume, stage)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    tok = load_align_tokenizer(recipe)
    return out, last, resume_step, tok, load_policy(recipe.model)


def sft(recipe: SFTRecipe, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) an SFT recipe with TRL's SFTTrainer. Returns a summary dict."""
    out, last, resume_step, tok, model = _setup(recipe, resume, "sft")  # checks TRL is installed
    from trl import SFTConfig

    train_ds, eval_ds = _datasets(recipe, prepare_sft_rows)
    kind = prepare_sft_rows(train_ds.select(range(1)), "data")[1]
    t = recipe.train
    args = SFTConfig(
        **_trainer_kwargs(recipe, out, progress),
        packing=t.packing,
        assistant_only_loss=kind == "conversational",
        completion_only_loss=True if kind == "prompt-completion" else None,
        dataset_num_proc=None,
    )
    cls = _summed_sft_trainer()
    try:
        trainer = cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok)
    except (ValueError, RuntimeError) as e:
        raise RecipeError(f"sft: TRL rejected the setup: {str(e).splitlines()[0]}") from None
    trainer.sum_loss = t.loss_reduction == "sum"
    return _train(trainer, recipe, out, "sft", tok, last, resume_step, stop_after)


def load_reference(spec: str):
    """DPO's frozen reference: an independent load of the checkpoint, BitLinear (quantized) forward."""
    model = load_policy(spec, what="ref_model")
    model.eval()
    model.requires_grad_(False)
    return model


def dpo(recipe: DPORecipe, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) a DPO recipe with TRL's DPOTrainer and an explicit quantized reference model."""
    out, last, resume_step, tok, model = _setup(recipe, resume, "dpo")  # checks TRL is installed
    from trl import DPOConfig, DPOTrainer

    ref = load_reference(recipe.ref_model or recipe.model)
    train_ds, eval_ds = _datasets(recipe, prepare_dpo_rows)
    t = recipe.train
    args = DPOConfig(
        **_trainer_kwargs(recipe, out, progress),
        beta=t.beta,
        loss_type=[t.loss_type],
        precompute_ref_log_probs=t.precompute_ref_log_probs,
        dataset_num_proc=None,
    )
    cls = _our_format_mixin(DPOTrainer)
    try:
        trainer = cls(model=model, ref_model=ref, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tok)
    except (ValueError, RuntimeError) as e:
        raise RecipeError(f"dpo: TRL rejected the setup: {str(e).splitlines()[0]}") from None
    return _train(trainer, recipe, out, "dpo", tok, last, resume_step, stop_after)


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
