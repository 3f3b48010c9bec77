"""The quantization warm-up: ``quant_lambda`` rises from 0 to 1 over a number of optimizer steps.

Used when turning a full-precision model into a ternary one (the recipe that made 1.58-bit
fine-tuning of Llama 3 8B work in public experiments). The pretraining, SFT and DPO loops all
call :func:`apply_warmup` once per optimizer step with the same recipe keys::

    quant_warmup:
      steps: 1000        # 0 = off (quantize fully from the first step)
      shape: linear      # linear | sigmoid
      k: 8.0             # steepness of the sigmoid
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

from bitnet_train.recipe import RecipeError


@dataclass
class QuantWarmupConfig:
    steps: int = field(default=0, metadata={"min": 0, "help": "optimizer steps for quant_lambda 0 -> 1; 0 = off"})
    shape: str = field(default="linear", metadata={"choices": ("linear", "sigmoid"), "help": "ramp shape"})
    k: float = field(default=8.0, metadata={"min": 0.0, "help": "sigmoid steepness"})

    def validate(self):
        if self.shape == "sigmoid" and self.k <= 0:
            raise RecipeError("quant_warmup.k must be > 0 for the sigmoid shape")


def quant_lambda_at(step: int, cfg: QuantWarmupConfig) -> float:
    """λ for optimizer step ``step`` (0-based): 0 at step 0, 1 from ``cfg.steps`` on."""
    if cfg.steps <= 0 or step >= cfg.steps:
        return 1.0
    t = max(step, 0) / cfg.steps
    if cfg.shape == "linear":
        return t
    # a sigmoid rescaled so that it starts at exactly 0 and ends at exactly 1
    lo = 1.0 / (1.0 + math.exp(cfg.k * 0.5))
    hi = 1.0 / (1.0 + math.exp(-cfg.k * 0.5))
    s = 1.0 / (1.0 + math.exp(-cfg.k * (t - 0.5)))
    return (s - lo) / (hi - lo)


def apply_warmup(model, step: int, cfg: QuantWarmupConfig) -> float:
    """Set every BitLinear's ``quant_lambda`` for this step; returns the value."""
    from bitnet_train.layers.bitlinear import set_quant_lambda

    lam = quant_lambda_at(step, cfg)
    set_quant_lambda(model, lam)
    return lam


@contextmanager
def fully_quantized(model):
    """Every BitLinear at ``quant_lambda`` 1 inside the block (the model as ``eval``, ``export`` and
    stock transformers run it), each back at its own value after."""
    from bitnet_train.layers.bitlinear import bitlinear_modules

    mods = [m for _, m in bitlinear_modules(model)]
    saved = [m.quant_lambda for m in mods]
    for m in mods:
        m.quant_lambda = 1.0
    try:
        yield
    finally:
        for m, v in zip(mods, saved):
            m.quant_lambda = v
