"""The quantization math of BitNet b1.58, in plain PyTorch.

This file is the single source of truth. Every fast path (the Triton kernels, the packed
exporters, llama.cpp formats) is tested against the functions here, and integer codes must
match them bit for bit.

Weights (per tensor, absmean ternary):
    s = max(mean(|W|), 1e-5)          computed in fp32
    t = clamp(round(W / s), -1, 1)    int8 codes in {-1, 0, 1}
    W_q = t * s

Activations (per token, i.e. over the last dimension, absmax int8):
    a = 127 / max(max(|x|), 1e-5)     fp32, shape [..., 1]
    q = clamp(round(x * a), -128, 127)
    x_q = q / a

Bit-for-bit parity with transformers: transformers' ``WeightQuant`` evaluates ``W / s`` as
``W * (1/s)`` and ``t * s`` as ``t / (1/s)``. Both differ from the direct forms by at most one
ulp, but activation quantization downstream turns ulps into flipped int8 codes (about 2e-3
relative logit error on a tiny model), so we evaluate them exactly as transformers does and stock
transformers reproduces our logits bit for bit. The scale we report and export is ``s``.

``round`` is round-half-to-even (``torch.round``). The math runs in fp32 whatever the input
dtype and the fake-quantized result is cast back to the input dtype. These are the formulas
of the BitNet b1.58 papers and of transformers' ``AutoBitLinear`` (online quantization).

Training uses a straight-through estimator: the backward pass of fake quantization is the
identity. ``quant_lambda`` blends quantization in (``x + lam * (quant(x) - x).detach()``) for
the warm-up used when converting full-precision models.
"""

from __future__ import annotations

import torch

WEIGHT_EPS = 1e-5
ACT_EPS = 1e-5
ACT_QMAX = 127
ACT_QMIN = -128


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """absmean scale ``s = max(mean|W|, 1e-5)`` as a float32 0-dim tensor (no host sync)."""
    return w.detach().float().abs().mean().clamp(min=WEIGHT_EPS)


def act_scale(x: torch.Tensor) -> torch.Tensor:
    """per-token scale ``a = 127 / max(max|x|, 1e-5)`` over the last dim, fp32 ``[..., 1]``."""
    # max|x| without materialising |x| (exact: a max involves no rounding)
    amax = torch.linalg.vector_norm(x.detach().float(), ord=float("inf"), dim=-1, keepdim=True)
    return ACT_QMAX / amax.clamp(min=ACT_EPS)


def weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes (int8, values in {-1, 0, 1}, shape of ``w``) and scale (fp32, 0-dim).

    ``w ≈ codes * scale``. ``W / s`` is evaluated as ``W * (1 / s)`` (see the module notes).
    """
    s = weight_scale(w)
    codes = torch.round(w.detach().float() * (1.0 / s)).clamp_(-1, 1).to(torch.int8)
    return codes, s


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes (shape of ``x``) and scale ``a`` (fp32, shape ``[..., 1]``).

    ``x ≈ codes / scale``.
    """
    xf = x.detach().float()
    a = act_scale(xf)
    codes = torch.round(xf * a).clamp_(ACT_QMIN, ACT_QMAX).to(torch.int8)
    return codes, a


def weight_dequant(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``codes * scale``, evaluated as ``codes / (1 / scale)`` like the fake-quant forward."""
    return (codes.float() / (1.0 / scale)).to(dtype)


def act_dequant(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (codes.float() / scale).to(dtype)


def weight_fake_quant_values(w: torch.Tensor) -> torch.Tensor:
    """``t * s`` in the dtype of ``w`` (no gradient). Equal to ``weight_dequant(*weight_quant(w))``:
    the codes are exact small integers in fp32, so skipping the int8 round trip changes no bit."""
    wf = w.detach().float()
    inv = 1.0 / weight_scale(wf)
    t = wf * inv  # a new tensor: the in-place ops below never touch w
    return t.round_().clamp_(-1, 1).div_(inv).to(w.dtype)


def act_fake_quant_values(x: torch.Tensor) -> torch.Tensor:
    """``q / a`` in the dtype of ``x`` (no gradient); equal to ``act_dequant(*act_quant(x))``."""
    xf = x.detach().float()
    a = act_scale(xf)
    q = xf * a
    # |x * a| <= 127 (+ a rounding error far below 0.5) by construction of a, so the clamp to
    # [-128, 127] of act_quant can never bite and is skipped here: the values are bit-identical
    return q.round_().div_(a).to(x.dtype)


class _STE(torch.autograd.Function):
    """Forward: a quantizer's output; backward: the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _blend(x: torch.Tensor, fn, quant_lambda: float) -> torch.Tensor:
    if quant_lambda <= 0.0:
        return x
    if quant_lambda >= 1.0:
        # exactly the quantized values forward (no x + (q - x) rounding), identity backward
        return _STE.apply(x, fn)
    return x + (quant_lambda * (fn(x) - x.detach())).detach()


def weight_fake_quant(w: torch.Tensor, quant_lambda: float = 1.0) -> torch.Tensor:
    """Ternary fake quantization with a straight-through (identity) gradient.

    ``quant_lambda`` in [0, 1] blends: ``w + lambda * (quant(w) - w).detach()``."""
    return _blend(w, weight_fake_quant_values, quant_lambda)


def act_fake_quant(x: torch.Tensor, quant_lambda: float = 1.0) -> torch.Tensor:
    """Per-token int8 fake quantization with a straight-through (identity) gradient."""
    return _blend(x, act_fake_quant_values, quant_lambda)


def bitlinear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    quant_lambda: float = 1.0,
) -> torch.Tensor:
    """The reference BitLinear forward: fake-quant activations and weights, then matmul."""
    xq = act_fake_quant(x, quant_lambda)
    wq = weight_fake_quant(weight, quant_lambda)
    return torch.nn.functional.linear(xq, wq, bias)


# ----------------------------------------------------------------------------------------------
# transformers' packed layout (integrations/bitnet.py): uint8 [ceil(out/4), in]; value = code + 1
# in 2 bits; packed row r holds output rows r, R+r, 2R+r, 3R+r in bits 0-1, 2-3, 4-5, 6-7.
# ----------------------------------------------------------------------------------------------


def pack_hf(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary int8 codes ``[out, in]`` into transformers' uint8 ``[ceil(out/4), in]``."""
    if codes.dim() != 2:
        raise ValueError(f"pack_hf expects a 2-D code matrix, got shape {tuple(codes.shape)}")
    out = codes.shape[0]
    rows = (out + 3) // 4
    vals = (codes.to(torch.int16) + 1).to(torch.uint8)
    padded = torch.ones((rows * 4, codes.shape[1]), dtype=torch.uint8, device=codes.device)
    padded[:out] = vals
    packed = torch.zeros((rows, codes.shape[1]), dtype=torch.uint8, device=codes.device)
    for i in range(4):
        packed |= padded[i * rows : (i + 1) * rows] << (2 * i)
    return packed


def unpack_hf(packed: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_hf`: int8 codes ``[out_features, in]``."""
    rows = packed.shape[0]
    parts = [((packed >> (2 * i)) & 3) for i in range(4)]
    codes = torch.cat(parts, dim=0).to(torch.int8) - 1
    if out_features is not None:
        codes = codes[:out_features]
    return codes
