"""Triton quantization kernels: per-token int8 activations (optionally after an RMSNorm) and
absmean ternary weights, bit-identical to :mod:`bitnet_train.quant`.

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


_DT_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _round_to(v, DT: tl.constexpr):
    """fp32 ``v`` rounded to dtype code ``DT`` (0 fp32, 1 bf16, 2 fp16) and back to fp32."""
    if DT == 1:
        # round to nearest even on the bits (Triton's CPU interpreter truncates in .to(bfloat16));
        # exact for finite values, overflow goes to inf as a true cast does
        b = v.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        r = b.to(tl.float32, bitcast=True)
    elif DT == 2:
        r = v.to(tl.float16).to(tl.float32)
    else:
        r = v
    return r


@triton.jit
def _rmsnorm_act_quant_kernel(
    X, W, Q, A, R, K, KF, stride_x, stride_q, eps,
    HAS_RSTD: tl.constexpr, DT_X: tl.constexpr, DT_Y: tl.constexpr,
    BLOCK: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
):
    # transformers' BitNetRMSNorm, then act_quant, in the reference's order of operations:
    #   xf = x.float(); var = xf.pow(2).mean(-1)  (sum, then / K)
    #   n = (xf * rsqrt(var + eps)).to(x.dtype); y = weight * n  (in promote(weight, x) dtype)
    #   a = 127 / max(amax|y|, eps_a); q = round(y * a)
    # three passes over the row (sum of squares, amax, codes); nothing but codes and a is written
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    q_row = Q + row * stride_q
    offs = tl.arange(0, BLOCK)
    if HAS_RSTD:
        rstd = tl.load(R + row)
    else:
        ss = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            m = (k0 + offs) < K
            x = tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32)
            ss += x * x
        var = tl.div_rn(tl.sum(ss, axis=0), KF)  # KF = float(K): K may be specialized to a constexpr
        if USE_LIBDEVICE:
            rstd = libdevice.rsqrt(var + eps)  # torch.rsqrt on CUDA is rsqrtf
        else:
            rstd = tl.div_rn(tl.full([], 1.0, tl.float32), tl.sqrt_rn(var + eps))  # torch.rsqrt on CPU
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        m = (k0 + offs) < K
        x = tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + k0 + offs, mask=m, other=0.0).to(tl.float32)
        y = _round_to(w * _round_to(x * rstd, DT_X), DT_Y)
        amax = tl.maximum(amax, tl.abs(y))
    amax_s = tl.maximum(tl.max(amax, axis=0), 1e-5)
    a = tl.div_rn(tl.full([], 1.0, tl.float32), amax_s) * 127.0
    for k0 in range(0, K, BLOCK):
        m = (k0 + offs) < K
        x = tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + k0 + offs, mask=m, other=0.0).to(tl.float32)
        y = _round_to(w * _round_to(x * rstd, DT_X), DT_Y)
        r = _rint(y * a, USE_LIBDEVICE)
        r = tl.minimum(tl.maximum(r, -128.0), 127.0)
        tl.store(q_row + k0 + offs, r.to(tl.int8), mask=m)
    tl.store(A + row, a)


def _row_block(k: int) -> int:
    return min(triton.next_power_of_2(max(k, 1)), 64 if _interpret() else 4096)


def act_quant(
    x: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes (shape of ``x``) and fp32 scale ``a`` ``[..., 1]``; equals
    ``quant.act_quant`` bit for bit. Any leading shape, any last-dim size, fp32/bf16/fp16.

    With ``norm_weight``, quantizes ``RMSNorm(x)`` instead (see :func:`rmsnorm_act_quant`)."""
    if norm_weight is not None:
        return rmsnorm_act_quant(x, norm_weight, eps)
    k = x.shape[-1]
    x2 = x.detach().reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    a = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m > 0:
        _act_quant_kernel[(m,)](
            x2, q, a, k, x2.stride(0), q.stride(0), BLOCK=_row_block(k), USE_LIBDEVICE=not _interpret()
        )
    return q.reshape(x.shape), a.reshape(*x.shape[:-1], 1)


def check_act_codes(x: torch.Tensor, act_q, where: str) -> None:
    """Raise ``ValueError`` unless ``act_q`` = ``(codes, a)`` has the layout :func:`act_quant`
    ``(x)`` returns: int8 codes of ``x``'s shape, fp32 scales ``[..., 1]``, on ``x``'s device."""
    codes, a = act_q
    want_a = (*x.shape[:-1], 1)
    if codes.dtype != torch.int8 or codes.shape != x.shape or codes.device != x.device:
        raise ValueError(
            f"{where}: act_q codes are {codes.dtype} {tuple(codes.shape)} on {codes.device}; "
            f"int8 {tuple(x.shape)} on {x.device} expected (act_quant(x))"
        )
    if a.dtype != torch.float32 or a.shape != want_a or a.device != x.device:
        raise ValueError(
            f"{where}: act_q scales are {a.dtype} {tuple(a.shape)} on {a.device}; "
            f"float32 {want_a} on {x.device} expected (act_quant(x))"
        )


def rmsnorm_act_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, rstd: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``act_quant(BitNetRMSNorm(x))`` in one kernel: the normalised activations are never
    written to memory. Returns int8 codes (shape of ``x``) and fp32 ``a`` ``[..., 1]``.

    The norm is transformers' ``BitNetRMSNorm`` (also our ``BitLinearRMSNorm``): fp32 mean of
    squares, ``x * rsqrt(var + eps)`` cast back to ``x.dtype``, times ``weight`` in
    ``promote_types(weight.dtype, x.dtype)``; every rounding of that chain is reproduced, so given
    the same per-row ``rsqrt`` the codes and scales equal ``quant.act_quant(norm(x))`` bit for bit.
    The sum of squares is reduced in another order than torch's (like :func:`weight_scale`), so
    ``rsqrt`` can differ by an ulp, which flips a code only when a value sits on a rounding tie.
    ``rstd`` (fp32, one per row) replaces the in-kernel reduction (used by the tests).
    """
    k = x.shape[-1]
    if weight.shape != (k,):
        raise ValueError(f"rmsnorm_act_quant: norm weight has shape {tuple(weight.shape)}, x's last dim is {k}")
    for name, t in (("x", x), ("norm weight", weight)):
        if t.dtype not in _DT_CODE:
            raise TypeError(f"rmsnorm_act_quant: {name} has dtype {t.dtype}; fp32, bf16 or fp16 expected")
    x2 = x.detach().reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight.detach().contiguous()
    m = x2.shape[0]
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    a = torch.empty((m,), dtype=torch.float32, device=x.device)
    if rstd is not None:
        rstd = rstd.detach().float().reshape(-1).contiguous()
        if rstd.numel() != m:
            raise ValueError(f"rmsnorm_act_quant: rstd has {rstd.numel()} values for {m} rows")
    if m > 0:
        _rmsnorm_act_quant_kernel[(m,)](
            x2, w, q, a, rstd if rstd is not None else a, k, float(k), x2.stride(0), q.stride(0), float(eps),
            HAS_RSTD=rstd is not None, DT_X=_DT_CODE[x.dtype],
            DT_Y=_DT_CODE[torch.promote_types(weight.dtype, x.dtype)],
            BLOCK=_row_block(k), USE_LIBDEVICE=not _interpret(),
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
