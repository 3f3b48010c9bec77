"""Negative log-likelihood from logits, float64: what ``bitnet-train eval`` sums and what ``export``'s
probe perplexity is made of (a leaf module: both import it)."""

from __future__ import annotations

import numpy as np


def window_nll(logits: np.ndarray, seq: list[int], n_pred: int) -> float:
    """Summed NLL (float64 log-softmax) of ``seq``'s last ``n_pred`` tokens, from the logits ``[len(seq) - 1, vocab]``
    of the model fed ``seq[:-1]``."""
    x = np.asarray(logits[len(seq) - 1 - n_pred : len(seq) - 1], dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return float(-(x[np.arange(n_pred), np.asarray(seq[-n_pred:])] - np.log(np.exp(x).sum(-1))).sum())
