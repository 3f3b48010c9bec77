"""BitLinear autograd on the Triton kernels: int8 forward, straight-through backward."""

from __future__ import annotations

import torch

from bitnet_train.kernels.matmul import _mm
from bitnet_train.kernels.quantize import act_quant, check_act_codes, weight_codes, weight_scale

# ---------------------------------------------------------------------------------------------
# BitLinear autograd
# ---------------------------------------------------------------------------------------------


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, [s, 1/s])`` of a latent weight, as the training forward uses them: int8 codes of
    ``weight``'s shape and the fp32 scale pair (see :func:`weight_scale`). BitLinear caches this
    per weight version so gradient-accumulation micro-batches quantize the weight once per step."""
    s_inv = weight_scale(weight)
    return weight_codes(weight, s_inv), s_inv


class TritonBitLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, weight_q, act_q):
        k = x.shape[-1]
        n = weight.shape[0]
        wq, s_inv = weight_q if weight_q is not None else quantize_weight(weight)
        xq, a = act_q if act_q is not None else act_quant(x)
        xq2 = xq.reshape(-1, k).contiguous()  # no copy for act_quant's codes (the kernels read row strides)
        a2 = a.reshape(-1).contiguous()
        y = _mm(xq2, a2, wq, s_inv, bias, x.dtype, n, k, False)
        ctx.save_for_backward(xq2, a2.reshape(-1, 1), wq, s_inv)
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
            # quant.weight_dequant's (t / (1/s)).to(dtype) for t in {-1, 0, 1} is t * c with
            # c = (1 / (1/s)).to(dtype) exactly (division by +-1 and sign are exact): one pass, no fp32 copy
            c = (1.0 / s_inv[1]).to(ctx.w_dtype)
            w_dq = wq.to(ctx.w_dtype) * c
            grad_x = (g2 @ w_dq.to(g2.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            x_dq = (xq2.float() / a).to(ctx.x_dtype)
            grad_w = (g2.t() @ x_dq.to(g2.dtype)).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


def bitlinear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    weight_q: tuple[torch.Tensor, torch.Tensor] | None = None,
    act_q: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """BitLinear with Triton kernels: forward = int8 activation codes x ternary weight codes
    (int32 accumulation) rescaled; backward = straight-through estimator:
    ``grad_x = grad @ W_deq``, ``grad_W = grad^T @ x_deq``, ``grad_b = sum(grad)``.

    ``weight_q`` = :func:`quantize_weight` ``(weight)`` computed beforehand (a cache); it must be
    the quantization of ``weight``'s current values. ``act_q`` = :func:`act_quant` ``(x)``
    computed beforehand (the codes q/k/v or gate/up share, see BitLinear): int8 codes of ``x``'s
    shape and fp32 per-token scales ``[..., 1]``, of ``x``'s current values; a wrong layout raises
    ``ValueError``. Without it the function quantizes ``x`` itself."""
    if act_q is not None:
        check_act_codes(x, act_q, "bitlinear_triton")
    return TritonBitLinearFn.apply(x, weight, bias, weight_q, act_q)
