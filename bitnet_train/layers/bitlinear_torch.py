"""The ``torch`` backend of :class:`~bitnet_train.layers.bitlinear.BitLinear`: its autograd function; and
the shared activation codes of sibling projections (both backends).

What the ``torch`` backend computes (``quant_lambda`` = 1):

* **Training** (autograd recording, i.e. grad enabled and the input or weight requiring grad),
  and anything **under autocast** (bf16/fp16, CPU or CUDA): the exact integer product, as the
  deployed kernels (I2_S, TQ2_0, IQ2_BN, our Triton kernels) compute it — :func:`quant.int_linear`:
  int8 codes x ternary codes accumulated exactly (``torch._int_mm``, int32), rescaled
  ``/ a / (1/s)`` in fp32, rounded once to the output dtype (the autocast dtype, else the input's).
  ``F.linear`` on the dequantized ``q/a`` and ``t*s`` (what autocast ran before) rounds both
  operands to bf16 first: only 57.3% of a 2560x2560 layer's outputs at 64 tokens equalled the
  exact result (``scripts/bench_quant.py exactness``). On the development CPU the int8 GEMM is also ~5x faster than the
  fp32 GEMM, which is what makes a BitNet training step as fast as a full-precision one
  (docs/performance.md, ``scripts/bench_memory.py``).
* **Inference without autocast** (no autograd: ``torch.no_grad``/``inference_mode``/frozen
  weights): ``F.linear`` on the dequantized operands rebuilt from the codes, in the input's and
  weight's dtypes — the arithmetic of stock transformers' ``AutoBitLinear`` (online), so stock
  transformers (eager) reproduces our logits bit for bit (tests/test_model.py asserts it). In
  fp32 it differs from the exact product by fp32 rounding only (about 1e-7 relative), so a
  training loss and an evaluation loss of the same batch agree to that. The switch
  ``exact_training_forward = False`` (``bitlinear.SWITCHES``) keeps this arithmetic in training too.
* **Backward** (all cases): the straight-through gradients of the fake-quantized product, from the
  codes: ``grad_x = g @ W_deq``, ``grad_W = g^T @ x_deq``, ``grad_b = sum(g)``, with
  ``W_deq``/``x_deq`` rebuilt bit for bit in the dtype the fake-quant product multiplied in (the
  autocast dtype under autocast): the gradients equal those of ``quant.bitlinear_reference``
  exactly (``torch.equal``, tested).

Shared inputs: q/k/v (and gate/up) projections that read the same tensor quantize it once
(:func:`~bitnet_train.layers.bitlinear.share_input_quantization`, applied by ``convert_to_bitlinear``; :class:`SharedActQuant`
below), on the ``torch`` backend and on the ``triton`` one (which hands the Triton ``act_quant``
kernel's codes to ``bitlinear_triton``, or to the packed GEMV kernel when decoding more than
``GEMV_FUSED_QUANT_MAX_M`` rows; up to that many rows the GEMV kernel quantizes inside itself and
nothing is shared); each keeps its own weight scale. Skipped under ``torch.compile``. Training keeps no weight codes for backward by default (``recompute_weight_codes``:
the backward quantizes the saved latent weight again, which measured cheaper in memory and no
slower); with ``recompute_weight_codes = False`` the codes are computed once per weight version
and kept until that layer's backward has run, so activation-checkpointing recomputes do not
quantize the weight again. Inference (no backward) quantizes each weight once per version.

``quant_lambda`` (the warm-up blend) lives in a 0-dim fp32 buffer (not in the state dict): the
blend ``x + λ (q(x) - x)`` reads it without branching on its value, so a compiled model does not
recompile when λ changes. The layer branches only on the regime (λ = 0, 0 < λ < 1, λ = 1), at
most two changes per warm-up.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitnet_train import quant


class TorchBitLinearFn(torch.autograd.Function):
    """The ``torch`` backend at ``quant_lambda`` = 1 (see the module notes for what it computes).

    Saved for backward: the int8 activation codes and their fp32 per-token scales, and either
    (``recompute``, the default in training) a reference to the latent weight parameter with this
    forward's scale, from which the backward makes the codes again, or the int8 ternary weight
    codes with their fp32 scale — never a fake-quantized float copy of the input or of the weight.
    ``codes``: the layer's :class:`WeightCodes` whose torch entry these codes came from, dropped
    once this backward has used them (``None``: nothing to drop)."""

    @staticmethod
    def forward(ctx, x, weight, bias, xq, a, wq, s, compute_dtype, recompute: bool, codes: "WeightCodes | None"):
        if compute_dtype is None:
            # stock transformers' arithmetic: F.linear on the dequantized operands, in their dtypes
            y = F.linear(quant.act_dequant(xq, a, x.dtype), quant.weight_dequant(wq, s, weight.dtype), bias)
        else:
            y = quant.int_linear(xq, a, wq, s, bias, compute_dtype)
        ctx.recompute = recompute
        if recompute:
            # keep no weight codes: the backward quantizes the (saved, not copied) latent weight again,
            # with the scale of this forward (a 0-dim tensor)
            ctx.save_for_backward(xq, a, weight, s)
        else:
            ctx.save_for_backward(xq, a, wq, s)
        ctx.compute_dtype = compute_dtype
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.codes = None if recompute else codes
        return y

    @staticmethod
    def backward(ctx, grad):
        xq, a, w, s = ctx.saved_tensors  # w: the latent weight (recompute) or its int8 codes
        n, k = w.shape
        g2 = grad.reshape(-1, n)
        grad_x = grad_w = grad_b = None
        # the dtypes the fake-quant product multiplied in: under autocast both operands were cast
        # to the autocast dtype, without it they stayed in the input's and the weight's dtype
        dx = ctx.compute_dtype or ctx.w_dtype
        dw = ctx.compute_dtype or ctx.x_dtype
        # the weight's gradient first, into a buffer allocated before its temporary (the dequantized
        # input) and before the weight codes and dequantized weight that grad_x needs: those
        # temporaries then reuse the space freed above the gradient instead of pushing later
        # gradients up the C heap (docs/performance.md, peak RSS). Same bits in either order.
        if ctx.needs_input_grad[1]:
            if torch.is_grad_enabled():  # create_graph: an out= product is not differentiable
                grad_w = g2.t().mm(quant.act_dequant(xq.reshape(-1, k), a.reshape(-1, 1), dw))
            else:
                grad_w = torch.empty((n, k), dtype=dw, device=g2.device)
                torch.mm(g2.t(), quant.act_dequant(xq.reshape(-1, k), a.reshape(-1, 1), dw), out=grad_w)
            grad_w = grad_w.to(ctx.w_dtype)
        wq, s = quant.weight_quant(w, s) if ctx.recompute else (w, s)  # autograd checked w is unchanged
        if ctx.codes is not None:
            ctx.codes.release_torch()  # this step's weight codes are not needed by any later forward
        if ctx.needs_input_grad[0]:
            grad_x = g2.mm(quant.weight_dequant(wq, s, dx)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def _act_quantizer(backend: str):
    """The activation quantizer a ``backend`` layer uses: ``quant.act_quant`` for ``torch``, the
    Triton kernel (``bitnet_train.kernels.autograd.act_quant``, the one ``bitlinear_triton`` calls
    when given no codes) for ``triton``. Looked up at call time."""
    if backend == "triton":
        from bitnet_train.kernels import autograd as triton_ops

        return triton_ops.act_quant
    if backend != "torch":
        raise ValueError(f"SharedActQuant: no activation quantizer for backend {backend!r}")
    return quant.act_quant


class SharedActQuant:
    """The activation codes of one input tensor, shared by the ``size`` sibling projections that
    read it (q/k/v, gate/up), on either backend. The first caller quantizes; the others find the
    same tensor object (a weak reference, and the same autograd version: not modified in place
    since) and reuse the codes; the last one drops them, so nothing outlives the forward.

    The entry is keyed by backend too: a layer gets codes made by its own backend's quantizer
    (:func:`_act_quantizer`), never another's. In a group whose members resolved to different
    backends, a member that finds the other backend's entry quantizes again and its codes replace
    the entry (the two quantizers agree bit for bit, tests/test_kernels.py, but the layer does not
    rely on that); the group still computes correct codes for each member, only shares less."""

    def __init__(self, size: int):
        self.size = size
        self._entry = None  # [weakref to x, key, (codes, scale), uses left]

    def __getstate__(self):  # pickling / deepcopy: the transient entry is not part of the state
        return {"size": self.size, "_entry": None}

    def codes(self, x: torch.Tensor, backend: str = "torch"):
        quantize = _act_quantizer(backend)
        if x.is_inference():  # inference tensors carry no version counter: in-place writes are unseen
            return quantize(x)
        key = (backend, x._version, torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        e = self._entry
        if e is not None and e[0]() is x and e[1] == key:
            e[3] -= 1
            if e[3] <= 0:
                self._entry = None
            return e[2]
        value = quantize(x)
        self._entry = [weakref.ref(x), key, value, self.size - 1] if self.size > 1 else None
        return value


class WeightCodes:
    """The cached ternary codes of one :class:`~bitnet_train.layers.bitlinear.BitLinear`'s weight (the
    layer's ``weight_codes`` attribute; not part of the state dict, not copied by ``deepcopy``).

    Codes are computed once per weight version and reused by every forward until the weight
    changes. The key is the parameter's identity, storage pointer, shape, dtype and autograd
    version counter: any in-place update (optimizer step, load_state_dict, copy_) bumps the
    version, and .to() or assigning .data changes the storage. Writes that bypass autograd's
    version counter (through .data of an alias or raw storage) are not seen; call :meth:`clear`
    after such writes, or name the tensor the weight is refilled from with :meth:`track` (FSDP2's
    sharded parameter: done by ``shard_model``).

    ``torch``: the codes (int8, a quarter of an fp32 weight) are kept from the forward to this
    layer's backward (activation-checkpointing recomputes reuse them), then dropped
    (:meth:`release_torch`), so they cost no memory at the optimizer step; without a backward
    (inference) they stay. ``triton``: kept until the weight changes (gradient-accumulation
    micro-batches too), with their 2-bit packing for the decoding GEMV built on first use.
    """

    def __init__(self):
        self.source: torch.Tensor | None = None  # the tensor the weight is refilled from (FSDP2)
        self.torch_entry = None  # (key, (int8 codes, fp32 scale)): quant.weight_quant
        self.triton_entry = None  # (key, (int8 codes, [s, 1/s])): kernels.quantize_weight
        self.packed_entry = None  # (key of triton_entry, 2-bit packed codes)

    def __deepcopy__(self, memo):  # a copy starts empty: keys name the original's tensors
        return WeightCodes()

    def __getstate__(self):  # pickling: the cache is transient
        return {}

    def __setstate__(self, state):
        self.__init__()

    def key(self, w: torch.Tensor):
        src = self.source
        return (id(w), w.data_ptr(), tuple(w.shape), w.dtype, w.device, w._version,
                None if src is None else (id(src), src._version), torch.is_inference_mode_enabled())

    def track(self, source: torch.Tensor | None) -> None:
        """Key the codes on ``source``'s autograd version too: the tensor that the weight seen by
        ``forward`` is refilled from without a version bump of its own. FSDP2 is the case
        (:func:`bitnet_train.training.distributed.shard_model` passes the sharded parameter): it all-gathers
        into the same unsharded tensor before every forward and preserves that tensor's version
        counter, while the optimizer step and a checkpoint load write the shard in place (a version
        bump). ``None`` stops tracking."""
        self.source = source
        self.clear()

    def torch_codes(self, w: torch.Tensor):
        key = self.key(w)
        if self.torch_entry is not None and self.torch_entry[0] == key:
            return self.torch_entry[1]
        value = quant.weight_quant(w)
        self.torch_entry = (key, value)
        return value

    def release_torch(self) -> None:
        self.torch_entry = None

    def triton_codes(self, w: torch.Tensor):
        # codes made under inference_mode are inference tensors, which autograd cannot save: the key
        # holds the mode
        key = self.key(w)
        if self.triton_entry is not None and self.triton_entry[0] == key:
            return self.triton_entry[1]
        from bitnet_train.kernels import quantize_weight

        value = quantize_weight(w)
        self.triton_entry = (key, value)
        return value

    def packed(self) -> torch.Tensor:
        """2-bit packed codes of the current Triton codes (built on first use)."""
        key, (codes, _) = self.triton_entry
        if self.packed_entry is None or self.packed_entry[0] != key:
            from bitnet_train.kernels import pack_ternary

            self.packed_entry = (key, pack_ternary(codes))
        return self.packed_entry[1]

    def clear(self) -> None:
        """Drop every cached code (they are rebuilt on demand)."""
        self.torch_entry = self.triton_entry = self.packed_entry = None


class BitLinearRMSNorm(nn.Module):
    """RMSNorm applied to a BitLinear's input (transformers' ``use_rms_norm`` option)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(dtype)
