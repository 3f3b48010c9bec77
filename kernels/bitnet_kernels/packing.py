"""2-bit packing of ternary codes (pure PyTorch, no Triton needed).

Our layout (``pack_ternary``), chosen so that a matmul tile along the reduction dim reads
contiguous bytes:

* codes ``[..., K]`` int8 in {-1, 0, 1}  ->  packed uint8 ``[..., ceil(K / 4)]``;
* the stored 2-bit value is ``code + 1`` (0, 1, 2; 3 never occurs);
* byte ``j`` of a row holds codes ``4j, 4j+1, 4j+2, 4j+3`` in bits 0-1, 2-3, 4-5, 6-7;
* padding past ``K`` holds value 1 (code 0), so a padded tail contributes nothing to a dot.

For a weight ``[out, in]`` the packing runs along ``in`` (the reduction dim of ``x @ W^T``).

How the matmul kernels read it (``matmul._ternary_gemv_kernel`` for decoding, ``matmul._ternary_mm_kernel``
for prefill): a tile of ``BK/4`` consecutive bytes of a row is one contiguous, coalesced load and
carries codes ``k = 4j + i`` in bits ``2i..2i+1``; shifting by ``2i`` and masking gives, for each
``i``, the ``[rows, BK/4]`` sub-matrix of the columns ``k ≡ i (mod 4)``, which is dotted (int8
``tl.dot``, int32 accumulation) with the matching activation columns (a stride-4 load, or a
contiguous tile split in registers). So every packed byte is read from memory exactly once and
unpacked with two integer ops; an interleaved layout (e.g. the 4 codes of a byte 32 or 128 columns
apart, as in bitnet.cpp's I2_S) would only change which activation columns pair with each shift,
not the weight traffic, so the simple layout stays. Row-major ``[out, ceil(in/4)]`` also lets a
GEMV program stream whole rows and a split-K program stream contiguous byte ranges.

(transformers' packed layout, uint8 ``[ceil(out / 4), in]``, is ``quant.pack_hf`` / ``quant.unpack_hf``:
the packed HF export's, not a kernel's.)
"""

from __future__ import annotations

import torch

from bitnet_train import quant


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 ternary codes ``[..., K]`` into uint8 ``[..., ceil(K/4)]`` (layout above)."""
    k = codes.shape[-1]
    kp = (k + 3) // 4
    vals = torch.ones((*codes.shape[:-1], kp * 4), dtype=torch.uint8, device=codes.device)
    vals[..., :k] = (codes.to(torch.int16) + 1).to(torch.uint8)
    vals = vals.view(*codes.shape[:-1], kp, 4)
    return vals[..., 0] | (vals[..., 1] << 2) | (vals[..., 2] << 4) | (vals[..., 3] << 6)


def unpack_ternary(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: int8 codes of ``shape`` (its last dim is ``K``)."""
    shape = tuple(shape)
    k = shape[-1]
    parts = [((packed >> (2 * i)) & 3) for i in range(4)]
    vals = torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 4)
    return (vals[..., :k].to(torch.int8) - 1).reshape(shape)
