"""The recipe schemas of ``bitnet-train sft`` and ``bitnet-train dpo`` (defaults named "2B4T" come
from the BitNet b1.58 2B4T technical report)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bitnet_train.training.distill import DistillConfig
from bitnet_train.training.metrics import WandbConfig
from bitnet_train.recipe import load_recipe
from bitnet_train.training.quant_warmup import QuantWarmupConfig


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
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
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
    distill: DistillConfig = field(default_factory=DistillConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


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
    wandb: WandbConfig = field(default_factory=WandbConfig)


def load_sft_recipe(path, overrides=None) -> SFTRecipe:
    return load_recipe(SFTRecipe, path, overrides)


def load_dpo_recipe(path, overrides=None) -> DPORecipe:
    return load_recipe(DPORecipe, path, overrides)
