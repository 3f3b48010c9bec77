"""Which backend a :class:`~bitnet_train.layers.bitlinear.BitLinear` runs: the names, the environment
override and the rule of ``auto``.

* ``torch``  — the PyTorch reference, always available (``bitlinear_torch.TorchBitLinearFn``).
* ``triton`` — the Triton kernels of :mod:`bitnet_train.kernels` (int8 forward, STE backward); CUDA
  tensors, or the CPU under ``TRITON_INTERPRET=1``.
* ``auto``   — the fastest measured: ``torch`` for now (the Triton kernels are correct but not yet
  faster on an H100, see docs/performance.md); ``triton`` on CUDA once ``AUTO_PREFERS_TRITON`` is set.

``BITNET_TRAIN_BACKEND`` overrides every layer's choice. A layer resolves its backend once per device
type (``BitLinear.backend_for``), not per forward.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("torch", "triton", "auto")
AUTO_PREFERS_TRITON = False  # flip when bitnet_train.kernels.bench shows the Triton path ahead of torch
BACKEND_ENV = "BITNET_TRAIN_BACKEND"


def check_backend(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown BitLinear backend {name!r} ({where}); choose one of {', '.join(BACKENDS)}")
    return name


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend that will actually run for a tensor on ``device``."""
    env = os.environ.get(BACKEND_ENV)
    name = check_backend(env, f"${BACKEND_ENV}") if env else requested
    if name == "auto":
        # the best available: on an H100 (docs/performance.md) the Triton kernels are still slower than torch's
        # bf16 path, so `auto` runs the torch reference until a tuned kernel beats it
        return "triton" if AUTO_PREFERS_TRITON and device.type == "cuda" and triton_available() else "torch"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "BitLinear backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels "
            "in Triton's CPU interpreter); use backend 'torch' or 'auto' on the CPU"
        )
    return name
