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

The exact product (:func:`int_linear`): ``y = (q @ t^T) / a / (1/s)``, where the integer dot
``q @ t^T`` is accumulated exactly (int32, or fp32 on integer-valued operands: exact while
``128 * in_features < 2**24``), rescaled in fp32 in the order of ``act_dequant`` then
``weight_dequant`` (and of the Triton kernels' epilogue), and rounded once to the output dtype.
This is what the deployed int8 x ternary kernels compute.
"""

from __future__ import annotations

import functools

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
    # max|x| (exact: a max involves no rounding). abs().amax() measured 8-19x faster on the CPU than
    # vector_norm(ord=inf), which avoids the |x| temporary (scripts/bench_quant.py act-scale)
    amax = x.detach().float().abs().amax(dim=-1, keepdim=True)
    return ACT_QMAX / amax.clamp(min=ACT_EPS)


def weight_quant(w: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes (int8, values in {-1, 0, 1}, shape of ``w``) and scale (fp32, 0-dim).

    ``w ≈ codes * scale``. ``W / s`` is evaluated as ``W * (1 / s)`` (see the module notes).
    ``scale``: ``weight_scale(w)`` computed before (unchanged ``w``), to skip that pass.
    """
    s = weight_scale(w) if scale is None else scale
    t = w.detach().float() * (1.0 / s)  # a new tensor: the in-place ops below never touch w
    return t.round_().clamp_(-1, 1).to(torch.int8), s


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes (shape of ``x``) and scale ``a`` (fp32, shape ``[..., 1]``).

    ``x ≈ codes / scale``.
    """
    xf = x.detach().float()
    a = act_scale(xf)
    q = xf * a  # a new tensor: the in-place ops below never touch x
    return q.round_().clamp_(ACT_QMIN, ACT_QMAX).to(torch.int8), a


def weight_dequant(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``codes * scale``, evaluated as ``codes / (1 / scale)`` like the fake-quant forward (one pass:
    the int8 codes are promoted to fp32 inside the division, which is exact)."""
    return (codes / (1.0 / scale.float())).to(dtype)


def act_dequant(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``codes / scale`` (one pass; int8 promoted to fp32 exactly), cast to ``dtype``."""
    return (codes / scale.float()).to(dtype)


@torch.compiler.assume_constant_result  # a fact of the machine: torch.compile takes its value, traces nothing
def cpu_int8_gemm_is_fast() -> bool:
    """Whether this CPU multiplies int8 matrices faster than fp32 ones in torch: with AVX-512, VNNI
    or AMX, ``torch._int_mm`` runs oneDNN's int8 kernels (measured cheap on an AVX-512 machine,
    docs/performance.md); on an AVX2-only x86 CPU it was 4.5-6.6x slower than the fp32 ``mm`` of the
    same operands (``python scripts/bench_quant.py int-gemm``, docs/performance.md), and
    other CPUs are not measured. Both paths give the same bits (:func:`_int_gemm`)."""
    return _cpu_has_int8_units()


@functools.cache  # apart from the function above: dynamo traces into (and warns about) a cached one
def _cpu_has_int8_units() -> bool:
    from bitnet_train.cpu_features import cpu_features

    return bool({"AVX-512", "VNNI", "AMX"} & set(cpu_features()))


def _int_gemm(xq2: torch.Tensor, wq: torch.Tensor, int8: bool | None = None) -> torch.Tensor:
    """``xq2 @ wq^T`` for int8 ``xq2 [M, K]`` and ternary int8 ``wq [N, K]``, exact, as fp32 ``[M, N]``.

    Two exact ways, the same bits: an int8 x int8 -> int32 product (``torch._int_mm``), or an fp32
    product of the integer-valued operands. ``int8`` picks one (tests); by default the int8 one
    where it is fast: CUDA shapes ``_int_mm`` takes, and CPUs of :func:`cpu_int8_gemm_is_fast`."""
    m, k = xq2.shape
    n = wq.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=torch.float32, device=xq2.device)
    if int8 is None:
        dev = xq2.device.type
        int8 = (dev == "cpu" and cpu_int8_gemm_is_fast()) or (
            dev == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0)
    if int8:
        # int8 x int8 -> int32: exact; |sum| <= 128 * K, so the fp32 conversion is exact for K < 2**17
        return torch._int_mm(xq2.contiguous(), wq.t()).float()
    # integer-valued fp32 operands: every product and partial sum is an integer of magnitude at most
    # 128 * K < 2**24 (K < 2**17), so the fp32 accumulation is exact in any order (TF32 inputs too:
    # the operands need 8 bits)
    with torch.autocast(xq2.device.type, enabled=False):
        return torch.mm(xq2.float(), wq.float().t())


def int_linear(
    xq: torch.Tensor,
    a: torch.Tensor,
    wq: torch.Tensor,
    s: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The exact BitLinear output from codes: ``(xq @ wq^T) / a / (1/s) (+ bias)`` with the integer
    product accumulated exactly, the rescale (and bias) in fp32, rounded once to ``out_dtype``.

    ``xq`` int8 ``[..., K]`` with per-token scales ``a`` ``[..., 1]`` (:func:`act_quant`); ``wq``
    int8 ternary ``[N, K]`` with scale ``s`` (:func:`weight_quant`)."""
    k = xq.shape[-1]
    n = wq.shape[0]
    if k >= 2**17:
        raise ValueError(f"int_linear: in_features {k} >= 2**17, the integer product would not be exact in fp32")
    y = _int_gemm(xq.reshape(-1, k), wq)
    y = y.div_(a.reshape(-1, 1).float()).div_(1.0 / s.float())
    if bias is not None:
        y = y.add_(bias.float())
    return y.to(out_dtype).reshape(*xq.shape[:-1], n)


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


def blend(x: torch.Tensor, fq: torch.Tensor, quant_lambda) -> torch.Tensor:
    """The warm-up blend ``x + lambda * (fq - x)`` of ``x`` and its fake-quantized values ``fq``,
    with an identity gradient. ``quant_lambda`` may be a float or a 0-dim fp32 tensor (no branch on
    it): the product is formed in fp32 and rounded to ``x``'s dtype, which is what torch does for a
    python-float ``lambda`` with a bf16/fp16 ``x`` (a 0-dim tensor would be rounded to bf16 first)."""
    d = fq - x.detach()
    return x + (quant_lambda * d.float()).to(d.dtype).detach()


def _blend(x: torch.Tensor, fn, quant_lambda: float) -> torch.Tensor:
    if quant_lambda <= 0.0:
        return x
    if quant_lambda >= 1.0:
        # exactly the quantized values forward (no x + (q - x) rounding), identity backward
        return _STE.apply(x, fn)
    return blend(x, fn(x), quant_lambda)


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
    parts = [((packed >> (2 * i)) & 3) for i in range(4)]
    codes = torch.cat(parts, dim=0).to(torch.int8) - 1
    if out_features is not None:
        codes = codes[:out_features]
    return codes
