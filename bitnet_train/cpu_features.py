"""The CPU's instruction-set features that decide a fast path, as torch reports them
(``torch.cpu._is_*_supported``): the int8 matmul (:func:`bitnet_train.quant.cpu_int8_gemm_is_fast`),
a bfloat16 teacher (:func:`bitnet_train.training.distill.bf16_is_fast`) and the machine line of the
benchmark scripts read them here."""

from __future__ import annotations

# the names we report, each with torch's probe (absent from older torch builds: reported as missing)
PROBES = {
    "AVX-512": "_is_avx512_supported",
    "AVX-512 BF16": "_is_avx512_bf16_supported",
    "VNNI": "_is_vnni_supported",
    "AMX": "_is_amx_tile_supported",
}


def cpu_features() -> list[str]:
    """The features of :data:`PROBES` this CPU has, in that order (not cached: the probes are cheap,
    and tests replace them)."""
    import torch

    return [name for name, probe in PROBES.items() if getattr(torch.cpu, probe, lambda: False)()]
