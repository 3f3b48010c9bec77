"""Triton kernels: activation / weight quantization, ternary int8 matmul, BitLinear autograd.

All integer codes are bit-identical to :mod:`bitnet_train.quant` (the source of truth):

* rounding is round-half-to-even. On the GPU we call ``libdevice.rint``; in Triton's CPU
  interpreter (``TRITON_INTERPRET=1``, no libdevice) we use ``(v + 1.5*2**23) - 1.5*2**23``,
  which is exact half-to-even in fp32 for ``|v| < 2**22`` (activations are ``<= 127.5``;
  weights are clamped to ``[-2, 2]`` first, which leaves the final clamp to ``[-1, 1]`` unchanged).
  Using ``rint`` on the GPU also avoids an FMA contraction of ``x * a + C``, which would round
  the exact product instead of the fp32 product and flip ties.
* divisions that feed codes use ``tl.div_rn`` (IEEE round to nearest), not Triton's default
  approximate fp32 division. ``quant.act_scale``'s ``127 / amax`` is a python scalar divided by
  a tensor, which torch evaluates as ``reciprocal(amax) * 127`` (differs from a true division in
  about a quarter of cases by an ulp); we evaluate it the same way.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .packing import pack_ternary

_MAGIC = 12582912.0  # 1.5 * 2**23


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _rint(v, USE_LIBDEVICE: tl.constexpr):
    if USE_LIBDEVICE:
        r = libdevice.rint(v)
    else:
        r = (v + 12582912.0) - 12582912.0
    return r


# ---------------------------------------------------------------------------------------------
# activations: one program per token row
# ---------------------------------------------------------------------------------------------


@triton.jit
def _act_quant_kernel(X, Q, A, K, stride_x, stride_q, BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    q_row = Q + row * stride_q
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        m = (k0 + offs) < K
        x = tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    amax_s = tl.maximum(tl.max(amax, axis=0), 1e-5)
    # torch evaluates ``127 / t`` (python scalar / tensor) as ``reciprocal(t) * 127``: match it
    a = tl.div_rn(tl.full([], 1.0, tl.float32), amax_s) * 127.0
    for k0 in range(0, K, BLOCK):
        m = (k0 + offs) < K
        x = tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32)
        v = x * a
        r = _rint(v, USE_LIBDEVICE)
        r = tl.minimum(tl.maximum(r, -128.0), 127.0)
        tl.store(q_row + k0 + offs, r.to(tl.int8), mask=m)
    tl.store(A + row, a)


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes (shape of ``x``) and fp32 scale ``a`` ``[..., 1]``; equals
    ``quant.act_quant`` bit for bit. Any leading shape, any last-dim size, fp32/bf16/fp16."""
    k = x.shape[-1]
    x2 = x.detach().reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    a = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m > 0:
        block = min(triton.next_power_of_2(max(k, 1)), 64 if _interpret() else 4096)
        _act_quant_kernel[(m,)](
            x2, q, a, k, x2.stride(0), q.stride(0), BLOCK=block, USE_LIBDEVICE=not _interpret()
        )
    return q.reshape(x.shape), a.reshape(*x.shape[:-1], 1)


# ---------------------------------------------------------------------------------------------
# weights: partial sums of |W| -> scale (on device) -> codes
# ---------------------------------------------------------------------------------------------


@triton.jit
def _abs_partial_kernel(W, P, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(W + offs, mask=offs < N, other=0.0).to(tl.float32)
    tl.store(P + pid, tl.sum(tl.abs(w), axis=0))


@triton.jit
def _scale_kernel(P, S, NP, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for p0 in range(0, NP, BLOCK):
        acc += tl.load(P + p0 + offs, mask=(p0 + offs) < NP, other=0.0).to(tl.float64)
    total = tl.sum(acc, axis=0)
    mean = (total / N).to(tl.float32)
    s = tl.maximum(mean, 1e-5)
    tl.store(S, s)
    tl.store(S + 1, tl.div_rn(tl.full([], 1.0, tl.float32), s))


@triton.jit
def _weight_codes_kernel(W, S, Q, N, BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    inv = tl.load(S + 1)
    w = tl.load(W + offs, mask=m, other=0.0).to(tl.float32)
    v = tl.minimum(tl.maximum(w * inv, -2.0), 2.0)
    r = _rint(v, USE_LIBDEVICE)
    r = tl.minimum(tl.maximum(r, -1.0), 1.0)
    tl.store(Q + offs, r.to(tl.int8), mask=m)


def _weight_block() -> int:
    return 256 if _interpret() else 4096


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """``[s, 1/s]`` (fp32, shape (2,)) with ``s = max(mean|W|, 1e-5)``, reduced on the device
    (no host sync).

    The sum of ``|W|`` is taken as fp32 partial sums per block, then added in fp64 and divided
    by ``numel`` in fp64 before the cast to fp32; torch's fp32 reduction uses another order, so
    ``s`` can differ from ``quant.weight_scale`` by an ulp or so. Given the same ``s``, codes are
    bit-identical (see :func:`weight_codes`); the tests check exactly that, and ``s`` to 2e-7 rel.
    """
    wf = w.detach().reshape(-1)
    if not wf.is_contiguous():
        wf = wf.contiguous()
    n = wf.numel()
    block = _weight_block()
    nparts = max(triton.cdiv(n, block), 1)
    parts = torch.empty((nparts,), dtype=torch.float32, device=w.device)
    _abs_partial_kernel[(nparts,)](wf, parts, n, BLOCK=block)
    s = torch.empty((2,), dtype=torch.float32, device=w.device)
    _scale_kernel[(1,)](parts, s, nparts, max(n, 1), BLOCK=64 if _interpret() else 1024)
    return s


def weight_codes(w: torch.Tensor, s_inv: torch.Tensor) -> torch.Tensor:
    """Ternary int8 codes ``clamp(round(W * inv), -1, 1)`` given ``s_inv = [s, 1/s]`` on device."""
    wf = w.detach().reshape(-1)
    if not wf.is_contiguous():
        wf = wf.contiguous()
    n = wf.numel()
    q = torch.empty((n,), dtype=torch.int8, device=w.device)
    if n > 0:
        block = _weight_block()
        _weight_codes_kernel[(triton.cdiv(n, block),)](
            wf, s_inv, q, n, BLOCK=block, USE_LIBDEVICE=not _interpret()
        )
    return q.reshape(w.shape)


def weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary int8 codes (shape of ``w``) and fp32 0-dim scale ``s``, as ``quant.weight_quant``.

    Codes are bit-identical to the reference given the same scale; the scale matches
    ``quant.weight_scale`` within about one ulp (different fp32 summation order, see
    :func:`weight_scale`). No host synchronisation.
    """
    s = weight_scale(w)
    return weight_codes(w, s), s[0]


# ---------------------------------------------------------------------------------------------
# int8 activations x ternary weights
# ---------------------------------------------------------------------------------------------


@triton.jit
def _ternary_mm_kernel(
    XQ, A, WB, S, BIAS, Y,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    PACKED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    for k0 in range(0, K, BK):
        kk = k0 + offs_k
        mask_k = kk < K
        xq = tl.load(
            XQ + offs_m[:, None].to(tl.int64) * stride_xm + kk[None, :],
            mask=mask_m[:, None] & mask_k[None, :], other=0,
        )
        wmask = mask_k[:, None] & mask_n[None, :]
        if PACKED:
            byte = tl.load(
                WB + offs_n[None, :].to(tl.int64) * stride_wn + (kk // 4)[:, None], mask=wmask, other=85
            )
            shift = ((kk % 4) * 2).to(tl.uint8)[:, None]
            wq = ((byte >> shift) & 3).to(tl.int8) - 1
        else:
            wq = tl.load(WB + offs_n[None, :].to(tl.int64) * stride_wn + kk[:, None], mask=wmask, other=0)
        acc = tl.dot(xq, wq, acc, out_dtype=tl.int32)
    a = tl.load(A + offs_m, mask=mask_m, other=1.0)
    inv_s = tl.load(S + 1)
    y = tl.div_rn(tl.div_rn(acc.to(tl.float32), a[:, None]), inv_s)
    if HAS_BIAS:
        b = tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(
        Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
        y.to(Y.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def _blocks(m: int) -> tuple[int, int, int]:
    if _interpret():
        return 16, 16, 32
    if m <= 16:
        return 16, 64, 128
    if m <= 64:
        return 64, 64, 128
    return 128, 128, 64


def _mm(xq2, a2, w, s_inv, bias, out_dtype, n, k, packed):
    m = xq2.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=xq2.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        y.zero_()
        if bias is not None:
            y += bias.to(out_dtype)
        return y
    bm, bn, bk = _blocks(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _ternary_mm_kernel[grid](
        xq2, a2, w, s_inv, bias if bias is not None else s_inv, y,
        m, n, k, xq2.stride(0), w.stride(0), y.stride(0),
        PACKED=packed, HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk,
    )
    return y


def _as_scale_pair(w_scale: torch.Tensor) -> torch.Tensor:
    if w_scale.numel() == 2:  # already [s, 1/s]
        return w_scale.float().contiguous()
    s = w_scale.detach().float().reshape(1)
    return torch.cat([s, 1.0 / s])


def ternary_matmul(x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, bias=None) -> torch.Tensor:
    """``y = act_fake_quant(x) @ (codes * s)^T (+ bias)`` with ``codes`` packed by
    :func:`pack_ternary` (``[out, ceil(in/4)]``), ``w_scale`` = ``s`` (0-dim/1-elem fp32 tensor).

    x is quantized per token to int8, the product is int8 x ternary with int32 accumulation,
    then rescaled by ``1/a`` and ``s`` (as ``/ (1/s)``). Output dtype = ``x.dtype``.
    """
    k = x.shape[-1]
    n = packed.shape[0]
    if packed.shape[-1] != (k + 3) // 4:
        raise ValueError(f"packed has {packed.shape[-1]} bytes per row; x's last dim {k} needs {(k + 3) // 4}")
    xq, a = act_quant(x)
    packed = packed if packed.stride(-1) == 1 else packed.contiguous()
    y = _mm(xq.reshape(-1, k), a.reshape(-1), packed, _as_scale_pair(w_scale), bias, x.dtype, n, k, True)
    return y.reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------------------------------------
# BitLinear autograd
# ---------------------------------------------------------------------------------------------


class _BitLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        k = x.shape[-1]
        n = weight.shape[0]
        s_inv = weight_scale(weight)
        wq = weight_codes(weight, s_inv)
        xq, a = act_quant(x)
        xq2 = xq.reshape(-1, k)
        y = _mm(xq2, a.reshape(-1), wq, s_inv, bias, x.dtype, n, k, False)
        ctx.save_for_backward(xq2, a.reshape(-1, 1), wq, s_inv)
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.w_dtype = weight.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad):
        xq2, a, wq, s_inv = ctx.saved_tensors
        n = wq.shape[0]
        g2 = grad.reshape(-1, n)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w_dq = (wq.float() / s_inv[1]).to(ctx.w_dtype)  # t / (1/s), as quant.weight_dequant
            grad_x = (g2 @ w_dq.to(g2.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            x_dq = (xq2.float() / a).to(ctx.x_dtype)
            grad_w = (g2.t() @ x_dq.to(g2.dtype)).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b


def bitlinear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """BitLinear with Triton kernels: forward = int8 activation codes x ternary weight codes
    (int32 accumulation) rescaled; backward = straight-through estimator:
    ``grad_x = grad @ W_deq``, ``grad_W = grad^T @ x_deq``, ``grad_b = sum(grad)``."""
    return _BitLinearFn.apply(x, weight, bias)
