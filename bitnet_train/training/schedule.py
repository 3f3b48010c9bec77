"""The learning-rate and weight-decay schedules of pretraining: pure functions of the optimizer
step, so a resumed run restores them from the step alone."""

from __future__ import annotations

import math


def _cosine(hi: float, lo: float, progress: float) -> float:
    progress = min(1.0, max(0.0, progress))
    return lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * progress))


def stage2_step(t) -> int:
    """First optimizer step (0-based) of stage two of a two_stage schedule."""
    return int(round(t.stage2_start * t.max_steps))


def lr_at(step: int, t) -> float:
    """LR of optimizer step ``step`` (0-based).

    ``cosine``: linear warm-up to ``lr``, then a cosine to ``min_lr`` at ``max_steps``.
    ``two_stage``: the same curve until ``stage2_step`` (cut there, before it reaches ``min_lr``),
    then an abrupt drop to ``stage2_lr`` and a cosine from it to ``stage2_min_lr`` at the last step.
    """
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "two_stage":
        s2 = stage2_step(t)
        if step >= s2:
            return _cosine(t.stage2_lr, t.stage2_min_lr, (step - s2) / max(1, t.max_steps - 1 - s2))
    span = max(1, t.max_steps - t.warmup_steps)
    return _cosine(t.lr, t.min_lr, (step - t.warmup_steps) / span)


def weight_decay_at(step: int, t) -> float:
    """AdamW weight decay (of the matrices) at optimizer step ``step`` (0-based).

    ``constant``: ``weight_decay``. ``cosine``: from ``weight_decay`` down to 0 along a cosine over
    the run, or, with the two_stage LR schedule, over stage one. In stage two of a two_stage
    schedule it is ``stage2_weight_decay`` (0 by default, as in the 2B4T report)."""
    end = t.max_steps
    if t.schedule == "two_stage":
        end = stage2_step(t)
        if step >= end:
            return t.stage2_weight_decay
    if t.weight_decay_schedule == "constant":
        return t.weight_decay
    return _cosine(t.weight_decay, 0.0, step / max(1, end))
