"""Triton kernels for BitNet (imported as ``bitnet_train.kernels``).

* :func:`act_quant`, :func:`weight_quant` — quantizers, bit-identical to :mod:`bitnet_train.quant`
* :func:`rmsnorm_act_quant` — RMSNorm fused with the activation quantizer
* :func:`pack_ternary`, :func:`unpack_ternary`
  — 2-bit packing (pure PyTorch; layout in :mod:`.packing`)
* :func:`ternary_matmul` — int8 x packed ternary matmul with int32 accumulation (split-K GEMV
  kernel for decoding, tiled kernel for prefill; autotuned on the GPU)
* :func:`bitlinear_triton` — the BitLinear autograd function (int8 forward, STE backward; takes
  precomputed activation codes, which q/k/v and gate/up share)

Run on CPU with ``TRITON_INTERPRET=1`` (slow; tests only).
"""

from bitnet_train.kernels.packing import pack_ternary, unpack_ternary

try:
    from bitnet_train.kernels.autograd import bitlinear_triton, quantize_weight
    from bitnet_train.kernels.matmul import ternary_matmul
    from bitnet_train.kernels.quantize import act_quant, rmsnorm_act_quant, weight_codes, weight_quant, weight_scale
except ImportError as _err:  # triton not installed
    _IMPORT_ERROR = _err

    def _missing(*args, **kwargs):
        raise ImportError(f"bitnet_train.kernels needs Triton: {_IMPORT_ERROR}")

    act_quant = rmsnorm_act_quant = weight_quant = weight_scale = weight_codes = quantize_weight = _missing
    ternary_matmul = bitlinear_triton = _missing

__all__ = [
    "act_quant",
    "rmsnorm_act_quant",
    "quantize_weight",
    "weight_quant",
    "weight_scale",
    "weight_codes",
    "pack_ternary",
    "unpack_ternary",
    "ternary_matmul",
    "bitlinear_triton",
]
