"""Benchmark: ``ternary_matmul`` (int8 activations x packed 2-bit ternary weights) vs bf16 ``F.linear``.

    python -m bitnet_train.kernels.bench            # needs a CUDA GPU and Triton

For each weight shape ``out x in`` in the BitNet b1.58 2B4T projections and each token count
``M``, prints the median time (``triton.testing.do_bench``) of

* ``F.linear(x_bf16, W_bf16)``,
* ``ternary_matmul(x_bf16, packed, s)`` — including the per-token activation quantization kernel,
* the int8 x ternary matmul alone (activation codes precomputed),

and the speedup of ``ternary_matmul`` over bf16. A script, not a test.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

SHAPES = [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)]  # (out, in)
TOKENS = [1, 16, 128, 2048]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    args = p.parse_args(argv)

    import triton.testing

    from bitnet_train import quant
    from bitnet_train.kernels import ops
    from bitnet_train.kernels import pack_ternary, ternary_matmul

    if not torch.cuda.is_available():
        raise SystemExit("bench: needs a CUDA GPU")
    dev = "cuda"
    torch.manual_seed(0)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")

    print(f"device: {torch.cuda.get_device_name()}")
    hdr = f"{'out x in':>12} {'M':>5} {'bf16 ms':>9} {'ternary ms':>11} {'mm-only ms':>11} {'speedup':>8}"
    print(hdr)
    print("-" * len(hdr))
    for n, k in SHAPES:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        codes, s = quant.weight_quant(w)
        packed = pack_ternary(codes)
        s_pair = ops._as_scale_pair(s)
        for m in TOKENS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            xq, a = ops.act_quant(x)
            xq2, a2 = xq.reshape(-1, k), a.reshape(-1)
            t_bf16 = bench(lambda: F.linear(x, w))
            t_tern = bench(lambda: ternary_matmul(x, packed, s))
            t_mm = bench(lambda: ops._mm(xq2, a2, packed, s_pair, None, x.dtype, n, k, True))
            print(f"{n:>5} x {k:<5} {m:>5} {t_bf16:>9.4f} {t_tern:>11.4f} {t_mm:>11.4f} {t_bf16 / t_tern:>7.2f}x")


if __name__ == "__main__":
    main()
