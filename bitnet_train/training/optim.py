"""The pretraining optimizer: AdamW over two parameter groups (matrices decayed, vectors not),
with its state created before the first forward (:func:`init_adamw_state`).

torch's AdamW creates its state (two fp32 tensors the size of every parameter: twice the
weights) lazily, inside the first ``step()``, after the first forward and backward have run. A
fresh run then learns only at the end of step 1 whether that state fits in memory, and the C
allocator places it after (on the CPU: above) the step's freed activations, a layout a resumed
run (whose state is read before the first forward) does not have. Creating it up front gives a
fresh run the resumed run's order; on the CPU (glibc's malloc) it lowered the peak RSS of a 350m
step for BitNet and for full precision alike (docs/performance.md, ``scripts/bench_memory.py
--optim-state eager|lazy``). The updates are the same bits (tests/test_optim.py).
"""

from __future__ import annotations

import torch


def param_groups(model, weight_decay: float) -> list[dict]:
    """Matrices (``ndim >= 2``) with ``weight_decay``, vectors (norms, biases) without; frozen
    parameters are left out."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The pretraining AdamW (betas 0.9/0.95, eps 1e-8) over :func:`param_groups`. Its state is
    not created yet: a resumed run loads it, a fresh one calls :func:`init_adamw_state`."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8)


def init_adamw_state(opt) -> int:
    """Create the state of an Adam/AdamW optimizer (``opt`` or an accelerate wrapper of one) now,
    exactly as its first ``step()`` would (``step`` 0, zero moments in each parameter's layout),
    for every trainable parameter that has none. The first update is then the same bits as with
    lazily created state. Returns the number of parameters given state; 0 (nothing done) for
    other optimizers and for ``fused`` / ``capturable`` groups, whose state torch places itself."""
    from torch.optim.optimizer import _get_scalar_dtype

    inner = getattr(opt, "optimizer", opt)
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        return 0
    if any(g.get("fused") or g.get("capturable") for g in inner.param_groups):
        return 0
    made = 0
    for group in inner.param_groups:
        for p in group["params"]:
            if not p.requires_grad or inner.state.get(p):
                continue
            state = {"step": torch.tensor(0.0, dtype=_get_scalar_dtype())}
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            inner.state[p] = state
            made += 1
    return made
