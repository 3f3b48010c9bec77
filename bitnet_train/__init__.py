"""bitnet-train: train 1.58-bit (ternary) BitNet language models and ship them to CPUs."""

from bitnet_train.layers.bitlinear import (
    BitLinear,
    convert_to_bitlinear,
    revert_to_linear,
    set_backend,
    set_quant_lambda,
)
from bitnet_train.checkpoint.format import CheckpointError, load_checkpoint, save_checkpoint
from bitnet_train.modeling.models import ModelSpecError, build_model, list_presets, load_model, load_preset

__version__ = "0.1.0"  # the one place: pyproject.toml reads it (dynamic = ["version"])

__all__ = [
    "BitLinear",
    "CheckpointError",
    "ModelSpecError",
    "build_model",
    "convert_to_bitlinear",
    "list_presets",
    "load_checkpoint",
    "load_model",
    "load_preset",
    "revert_to_linear",
    "save_checkpoint",
    "set_backend",
    "set_quant_lambda",
]
