"""``bitnet-train sft RECIPE.yaml`` and ``bitnet-train dpo RECIPE.yaml``: alignment through TRL.

Both stages run TRL's own trainers (``SFTTrainer`` / ``DPOTrainer`` with ``SFTConfig`` /
``DPOConfig``) on a BitNet model whose linear layers stay :class:`~bitnet_train.layers.bitlinear.BitLinear`
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

from bitnet_train.align.data import load_rows, prepare_dpo_rows, prepare_sft_rows
from bitnet_train.align.models import check_chat_template, load_align_tokenizer, load_policy, load_reference
from bitnet_train.align.recipes import (
    AlignDataConfig,
    AlignTrainConfig,
    DPORecipe,
    DPOTrainConfig,
    SFTRecipe,
    SFTTrainConfig,
    load_dpo_recipe,
    load_sft_recipe,
)
from bitnet_train.align.stages import cmd_align, dpo, register, sft
from bitnet_train.align.trainer import TokenCounter, quant_warmup_callback
from bitnet_train.checkpoint.hf_trainer import latest_trainer_checkpoint
from bitnet_train.errors import AlignDataError

__all__ = [
    "AlignDataConfig",
    "AlignDataError",
    "AlignTrainConfig",
    "DPORecipe",
    "DPOTrainConfig",
    "SFTRecipe",
    "SFTTrainConfig",
    "TokenCounter",
    "check_chat_template",
    "cmd_align",
    "dpo",
    "latest_trainer_checkpoint",
    "load_align_tokenizer",
    "load_dpo_recipe",
    "load_policy",
    "load_reference",
    "load_rows",
    "load_sft_recipe",
    "prepare_dpo_rows",
    "prepare_sft_rows",
    "quant_warmup_callback",
    "register",
    "sft",
]
