"""Triton ternary matmul kernels: int8 activations x 2-bit/int8 ternary weights with int32
accumulation (a split-K GEMV for decoding, a tiled kernel otherwise), autotuning and launch."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from bitnet_train.kernels.quantize import _DT_CODE, _interpret, _rint, act_quant, check_act_codes

# ---------------------------------------------------------------------------------------------
# int8 activations x ternary weights
# ---------------------------------------------------------------------------------------------


@triton.jit
def _epilogue(acc, a, S, BIAS, Y, offs_m, offs_n, mask_m, mask_n, stride_ym, HAS_BIAS: tl.constexpr):
    # y = acc / a / (1/s) (+ bias): the reference's act_dequant then weight_dequant order; S[0] = s
    # and 1/s is rounded as torch's ``1.0 / s`` (a correctly rounded reciprocal)
    inv_s = tl.div_rn(tl.full([], 1.0, tl.float32), tl.load(S))
    y = tl.div_rn(tl.div_rn(acc.to(tl.float32), a[:, None]), inv_s)
    if HAS_BIAS:
        b = tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(
        Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
        y.to(Y.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit
def _ternary_mm_kernel(
    XQ, A, WB, S, BIAS, Y,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_ym,
    PACKED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, X_SPLIT: tl.constexpr,
):
    # tiled path (prefill, training): one [BM, BN] output tile per program, grouped ordering so
    # that programs running together share weight tiles in L2. Packed weights: a tile of BK/4
    # bytes per row holds codes k = 4j + i in bits 2i..2i+1; each i is one int8 tl.dot against
    # the activation columns k = 4j + i, so the packed bytes are read once and never re-laid out.
    # X_SPLIT (an autotuned choice): load the [BM, BK] activation tile contiguously and split it
    # into the four k = 4j + i sub-tiles in registers, instead of four stride-4 loads.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = XQ + offs_m[:, None].to(tl.int64) * stride_xm
    w_cols = WB + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    if PACKED:
        offs_j = tl.arange(0, BK // 4)
        KB = (K + 3) // 4
        for j0 in range(0, KB, BK // 4):
            jj = j0 + offs_j
            byte = tl.load(w_cols + jj[:, None], mask=(jj < KB)[:, None] & mask_n[None, :], other=85)
            if X_SPLIT:
                kx = j0 * 4 + tl.arange(0, BK)
                xt = tl.load(x_rows + kx[None, :], mask=mask_m[:, None] & (kx < K)[None, :], other=0)
                x_even, x_odd = tl.split(tl.reshape(xt, [BM, BK // 4, 2, 2]))  # k % 2 == 0 / 1
                x0, x2 = tl.split(x_even)  # k % 4 == 0, 2
                x1, x3 = tl.split(x_odd)  # k % 4 == 1, 3
                acc = tl.dot(x0, (byte & 3).to(tl.int8) - 1, acc, out_dtype=tl.int32)
                acc = tl.dot(x1, ((byte >> 2) & 3).to(tl.int8) - 1, acc, out_dtype=tl.int32)
                acc = tl.dot(x2, ((byte >> 4) & 3).to(tl.int8) - 1, acc, out_dtype=tl.int32)
                acc = tl.dot(x3, ((byte >> 6) & 3).to(tl.int8) - 1, acc, out_dtype=tl.int32)
            else:
                for i in tl.static_range(4):
                    kk = jj * 4 + i
                    xq = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & (kk < K)[None, :], other=0)
                    wq = ((byte >> (2 * i)) & 3).to(tl.int8) - 1
                    acc = tl.dot(xq, wq, acc, out_dtype=tl.int32)
    else:
        offs_k = tl.arange(0, BK)
        for k0 in range(0, K, BK):
            kk = k0 + offs_k
            mask_k = kk < K
            xq = tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
            wq = tl.load(w_cols + kk[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0)
            acc = tl.dot(xq, wq, acc, out_dtype=tl.int32)
    a = tl.load(A + offs_m, mask=mask_m, other=1.0)
    _epilogue(acc, a, S, BIAS, Y, offs_m, offs_n, mask_m, mask_n, stride_ym, HAS_BIAS)


@triton.jit
def _ternary_gemv_kernel(
    XQ, A, WB, S, BIAS, Y, WS, LOCK,
    M, N, K, M_BUCKET,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, QUANT_X: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK4: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # decode path (M <= GEMV_MAX_M): program (pid_n, pid_k) streams the packed bytes of BN weight
    # rows once, for the byte chunks pid_k, pid_k + SPLIT_K, ...; all M (<= BM) activation rows
    # stay in registers/L1. int32 partial sums of a split are added into the int32 workspace WS;
    # the program that finishes a column block last (counter in LOCK) takes the sum, resets WS and
    # LOCK to zero for the next call (atomic exchange) and writes the rescaled output. Integer
    # sums are exact, so the result does not depend on the order in which splits finish.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_j = tl.arange(0, BK4)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = XQ + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = WB + offs_n[:, None].to(tl.int64) * stride_wn
    KB = (K + 3) // 4
    if QUANT_X:
        # XQ holds the float activations: every program quantizes them itself (the same math as
        # _act_quant_kernel: the same a and codes), saving a launch and the codes' round trip
        amax = tl.zeros([BM, 4 * BK4], dtype=tl.float32)
        offs_kx = tl.arange(0, 4 * BK4)
        for k0 in range(0, K, 4 * BK4):
            kx = k0 + offs_kx
            xv = tl.load(x_rows + kx[None, :], mask=mask_m[:, None] & (kx < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.abs(xv.to(tl.float32)))
        amax_r = tl.maximum(tl.max(amax, axis=1), 1e-5)
        a = tl.div_rn(tl.full([BM], 1.0, tl.float32), amax_r) * 127.0
    else:
        a = tl.load(A + offs_m, mask=mask_m, other=1.0)
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    for c in range(pid_k, tl.cdiv(KB, BK4), SPLIT_K):
        jj = c * BK4 + offs_j
        byte = tl.load(w_rows + jj[None, :], mask=mask_n[:, None] & (jj < KB)[None, :], other=85)  # [BN, BK4]
        for i in tl.static_range(4):
            kk = jj * 4 + i
            xmask = mask_m[:, None] & (kk < K)[None, :]
            if QUANT_X:
                xv = tl.load(x_rows + kk[None, :], mask=xmask, other=0.0).to(tl.float32)
                r = _rint(xv * a[:, None], USE_LIBDEVICE)
                xq = tl.minimum(tl.maximum(r, -128.0), 127.0).to(tl.int8)
            else:
                xq = tl.load(x_rows + kk[None, :], mask=xmask, other=0)
            wq = ((byte >> (2 * i)) & 3).to(tl.int8) - 1
            acc = tl.dot(xq, tl.trans(wq), acc, out_dtype=tl.int32)
    if SPLIT_K == 1:
        _epilogue(acc, a, S, BIAS, Y, offs_m, offs_n, mask_m, mask_n, stride_ym, HAS_BIAS)
    else:
        mask = mask_m[:, None] & mask_n[None, :]
        ws = WS + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial sums are in before the counter (acq_rel) moves
        done = tl.atomic_add(LOCK + pid_n, 1)
        if done == SPLIT_K - 1:
            total = tl.atomic_xchg(ws, tl.zeros([BM, BN], dtype=tl.int32), mask=mask)
            tl.atomic_xchg(LOCK + pid_n, 0)
            _epilogue(total, a, S, BIAS, Y, offs_m, offs_n, mask_m, mask_n, stride_ym, HAS_BIAS)


# ---------------------------------------------------------------------------------------------
# launch configuration: autotuned on the GPU (keyed on the M bucket, N and K), one fixed
# configuration in the interpreter or with BITNET_TRAIN_AUTOTUNE=0
# ---------------------------------------------------------------------------------------------

GEMV_MAX_M = 16  # token counts up to this take the GEMV path (decoding); more take the tiled path
GEMV_FUSED_QUANT_MAX_M = 4  # up to this many rows the GEMV kernel also quantizes the activations


def _autotune_enabled() -> bool:
    return not _interpret() and os.environ.get("BITNET_TRAIN_AUTOTUNE", "1") != "0"


# fixed configurations (meta-parameters, num_warps, num_stages); tests swap these to reach
# every code path (e.g. SPLIT_K == 1 and > 1) with small shapes
GEMV_FIXED = (
    dict(BN=16, BK4=8, SPLIT_K=2) if _interpret() else dict(BN=32, BK4=64, SPLIT_K=4),
    4, 3,
)
MM_FIXED = (
    dict(BM=16, BN=16, BK=32, GROUP_M=2, X_SPLIT=True)
    if _interpret()
    else dict(BM=128, BN=128, BK=128, GROUP_M=8, X_SPLIT=False),
    8, 3,
)


def _gemv_configs():
    cfgs = []
    for bn, bk4, splits, warps in [
        (16, 128, (1, 2, 4, 8), 4),
        (32, 64, (1, 2, 4, 8), 4),
        (64, 64, (1, 2, 4), 4),
        (64, 32, (2, 4, 8), 4),
        (128, 32, (4, 8), 8),
        (16, 64, (2, 4, 8), 2),
    ]:
        for sk in splits:
            cfgs.append(triton.Config(dict(BN=bn, BK4=bk4, SPLIT_K=sk), num_warps=warps, num_stages=3))
    return cfgs


def _mm_configs():
    cfgs = []
    for bm, bn, bk, warps, stages in [
        (128, 128, 128, 8, 3),
        (128, 256, 128, 8, 3),
        (256, 128, 128, 8, 3),
        (128, 128, 256, 8, 3),
        (64, 128, 128, 4, 4),
        (128, 64, 128, 4, 4),
        (64, 64, 256, 4, 3),
        (32, 64, 256, 4, 4),
        (16, 64, 256, 4, 4),
        (32, 128, 128, 4, 4),
    ]:
        for x_split in (False, True):
            cfgs.append(
                triton.Config(dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, X_SPLIT=x_split), num_warps=warps, num_stages=stages)
            )
    return cfgs


_TUNED = {}


def _tuned(name):
    if name not in _TUNED:
        if name == "gemv":
            _TUNED[name] = triton.autotune(_gemv_configs(), key=["M_BUCKET", "N", "K"])(_ternary_gemv_kernel)
        else:
            _TUNED[name] = triton.autotune(_mm_configs(), key=["M_BUCKET", "N", "K", "PACKED"])(_ternary_mm_kernel)
    return _TUNED[name]


_WORKSPACE = {}


def _gemv_workspace(device: torch.device, m: int, n: int):
    """Per device and stream: an int32 [>= m*n] accumulator and an int32 [>= n] counter array,
    all zero between calls (each GEMV leaves them zeroed)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    ws, lock = _WORKSPACE.get(key, (None, None))
    if ws is None or ws.numel() < m * n or lock.numel() < n:
        size = max(m * n, ws.numel() if ws is not None else 0)
        ws = torch.zeros((size,), dtype=torch.int32, device=device)
        lock = torch.zeros((max(n, lock.numel() if lock is not None else 0),), dtype=torch.int32, device=device)
        _WORKSPACE[key] = (ws, lock)
    return ws, lock


def _launch(kernel_name, grid_fn, args, extra):
    if _autotune_enabled():
        _tuned(kernel_name)[grid_fn](*args, **extra)
        return
    meta, warps, stages = GEMV_FIXED if kernel_name == "gemv" else MM_FIXED
    raw = _ternary_gemv_kernel if kernel_name == "gemv" else _ternary_mm_kernel
    raw[grid_fn(meta)](*args, **extra, **meta, num_warps=warps, num_stages=stages)


def _mm(xq2, a2, w, s_inv, bias, out_dtype, n, k, packed):
    """y[m, n] = (xq2 @ codes(w)^T) / a / (1/s) (+ bias); ``w`` packed uint8 [n, ceil(k/4)] or
    int8 codes [n, k]; ``s_inv[0]`` = s. Packed weights with m <= GEMV_MAX_M take the GEMV kernel.
    ``a2=None``: ``xq2`` holds float activations, quantized inside the GEMV kernel."""
    m = xq2.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=xq2.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        y.zero_()
        if bias is not None:
            y += bias.to(out_dtype)
        return y
    b = bias if bias is not None else s_inv
    quant_x = a2 is None
    if quant_x:
        a2 = s_inv  # unused pointer
        assert packed and m <= GEMV_MAX_M
    if packed and m <= GEMV_MAX_M:
        ws, lock = _gemv_workspace(xq2.device, m, n)
        args = (xq2, a2, w, s_inv, b, y, ws, lock, m, n, k, min(triton.next_power_of_2(m), GEMV_MAX_M),
                xq2.stride(0), w.stride(0), y.stride(0))
        _launch("gemv", lambda meta: (triton.cdiv(n, meta["BN"]), meta["SPLIT_K"]), args,
                dict(HAS_BIAS=bias is not None, QUANT_X=quant_x, USE_LIBDEVICE=not _interpret(), BM=16))
        return y
    args = (xq2, a2, w, s_inv, b, y, m, n, k, min(triton.next_power_of_2(m), 4096),
            xq2.stride(0), w.stride(0), y.stride(0))
    _launch("mm", lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),), args,
            dict(PACKED=packed, HAS_BIAS=bias is not None))
    return y


def _scale_arg(w_scale: torch.Tensor) -> torch.Tensor:
    """The kernels read ``s`` from element 0 (``s`` or the pair ``[s, 1/s]``); no copy for fp32."""
    s = w_scale.detach().reshape(-1)
    if s.numel() not in (1, 2):
        raise ValueError(f"w_scale must hold the per-tensor scale s (1 element) or [s, 1/s], got shape {tuple(w_scale.shape)}")
    return s if s.dtype == torch.float32 and s.is_contiguous() else s.float().contiguous()


def ternary_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias=None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    act_q: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``y = act_fake_quant(x) @ (codes * s)^T (+ bias)`` with ``codes`` packed by
    :func:`pack_ternary` (``[out, ceil(in/4)]``), ``w_scale`` = ``s`` (0-dim/1-elem fp32 tensor).

    x is quantized per token to int8 (after the fused RMSNorm when ``norm_weight`` is given, see
    :func:`rmsnorm_act_quant`), the product is int8 x ternary with int32 accumulation, then
    rescaled by ``1/a`` and ``s`` (as ``/ (1/s)``). Output dtype = ``x.dtype``. Up to
    ``GEMV_MAX_M`` tokens run the split-K GEMV kernel (decoding), more the tiled kernel.

    ``act_q`` = :func:`act_quant` ``(x)`` computed beforehand (codes shared by sibling layers):
    used instead of quantizing ``x`` (not with ``norm_weight``); a wrong layout raises ``ValueError``.
    """
    k = x.shape[-1]
    n = packed.shape[0]
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a 2-D uint8 tensor [out, ceil(in/4)], got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[-1] != (k + 3) // 4:
        raise ValueError(f"packed has {packed.shape[-1]} bytes per row; x's last dim {k} needs {(k + 3) // 4}")
    packed = packed if packed.stride(-1) == 1 else packed.contiguous()
    m = math.prod(x.shape[:-1])
    if act_q is not None:
        if norm_weight is not None:
            raise ValueError("ternary_matmul: act_q (precomputed codes) and norm_weight (fused RMSNorm) exclude each other")
        check_act_codes(x, act_q, "ternary_matmul")
        xq, a = act_q
        y = _mm(xq.reshape(-1, k).contiguous(), a.reshape(-1).contiguous(), packed, _scale_arg(w_scale), bias, x.dtype, n, k, True)
    elif norm_weight is None and 0 < m <= GEMV_FUSED_QUANT_MAX_M and k > 0:
        # decoding: the GEMV kernel quantizes the activations itself (one launch instead of two;
        # each program re-reads x to find its amax, which pays off only for a few rows)
        if x.dtype not in _DT_CODE:
            raise TypeError(f"ternary_matmul: x has dtype {x.dtype}; fp32, bf16 or fp16 expected")
        x2 = x.detach().reshape(-1, k)
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        y = _mm(x2, None, packed, _scale_arg(w_scale), bias, x.dtype, n, k, True)
    else:
        xq, a = act_quant(x, norm_weight, eps)
        y = _mm(xq.reshape(-1, k), a.reshape(-1), packed, _scale_arg(w_scale), bias, x.dtype, n, k, True)
    return y.reshape(*x.shape[:-1], n)
