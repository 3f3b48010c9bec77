#!/usr/bin/env python3
"""BitLinear (torch reference backend) forward+backward against nn.Linear, on the CPU, fp32.

For each BitNet b1.58 2B4T projection shape, times both layers in this one process, alternating
them so machine load affects both alike, and prints the median time of each and the ratio.

    python scripts/bench_bitlinear.py [--tokens 512] [--repeats 7] [--threads N]

``--exactness`` instead prints, for the same shapes under CPU bf16 autocast, the share of outputs
equal to the exact integer product rounded once to bf16, for BitLinear and for the fake-quant
path (``F.linear`` on the dequantized operands, what BitLinear ran before its exact int8 product).

``--act-scale`` times the per-token ``max|x|`` of :func:`bitnet_train.quant.act_scale` in the two
exact forms, ``x.abs().amax(-1)`` (what it uses) and ``torch.linalg.vector_norm(x, inf, -1)``
(what it used before, which avoids the ``|x|`` temporary), on ``--tokens`` x each input width,
checks that they agree bit for bit, and prints the median times and their ratio.

``--int-gemm`` times the two exact products of :func:`bitnet_train.quant._int_gemm` on the CPU,
``torch._int_mm`` (int8 x int8 -> int32) against the fp32 ``mm`` of the same integer operands, on
the tiny preset's and 2B4T's shapes, checks they agree bit for bit, and prints which one
``_int_gemm`` picks on this CPU (:func:`bitnet_train.quant.cpu_int8_gemm_is_fast`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from bitnet_train import BitLinear, quant

SHAPES = [  # (out_features, in_features) of 2B4T's projections
    ("q/o 2560x2560", 2560, 2560),
    ("k/v 640x2560", 640, 2560),
    ("gate/up 6912x2560", 6912, 2560),
    ("down 2560x6912", 2560, 6912),
]


def step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    layer.weight.grad = None
    x.grad = None
    y = layer(x)
    y.backward(g)


def timed(layer, x, g) -> float:
    t0 = time.perf_counter()
    step(layer, x, g)
    return time.perf_counter() - t0


def exactness(tokens: int) -> None:
    print(f"CPU bf16 autocast, {tokens} tokens: share of outputs equal to the exact int8 x ternary product "
          "rounded once to bf16 (relative difference, norm of the error over norm of the exact output)")
    print(f"{'shape':<20} {'BitLinear':>18} {'fake-quant F.linear':>22}")
    for name, out_f, in_f in SHAPES:
        bit = BitLinear(in_f, out_f, backend="torch")
        x = torch.randn(tokens, in_f)
        xq, a = quant.act_quant(x)
        wq, s = quant.weight_quant(bit.weight)
        acc = (xq.long() @ wq.long().t()).float()  # int64: exact by construction
        exact = ((acc / a) / (1.0 / s)).to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = bit(x)
            old = quant.bitlinear_reference(x, bit.weight)
        cells = []
        for y in (ours, old):
            eq = (y == exact).float().mean().item()
            rel = ((y.float() - exact.float()).norm() / exact.float().norm()).item()
            cells.append(f"{eq * 100:6.1f}% ({rel:.1e})")
        print(f"{name:<20} {cells[0]:>18} {cells[1]:>22}")


def alternated_medians(forms, repeats: int, inner: int = 1) -> list[float]:
    """Median seconds per call of each callable, timed alternately ``repeats`` times (``inner`` calls a round)."""
    times = [[] for _ in forms]
    for _ in range(repeats):
        for f, ts in zip(forms, times):
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            ts.append((time.perf_counter() - t0) / inner)
    return [statistics.median(ts) for ts in times]


def act_scale_forms(tokens: int, repeats: int) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {tokens} tokens, median of {repeats}")
    print(f"{'input width':<12} {'abs().amax us':>14} {'vector_norm(inf) us':>20} {'ratio':>7}")
    for k in sorted({in_f for _, _, in_f in SHAPES}):
        x = torch.randn(tokens, k)
        forms = (lambda: x.abs().amax(dim=-1, keepdim=True),
                 lambda: torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True))
        if not torch.equal(forms[0](), forms[1]()):
            raise SystemExit(f"the two forms of max|x| differ at width {k}")
        a, v = alternated_medians(forms, repeats, inner=10)
        print(f"{k:<12} {a * 1e6:>14.0f} {v * 1e6:>20.0f} {v / a:>6.1f}x")


def int_gemm_forms(tokens: int, repeats: int) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {tokens} tokens, median of {repeats}; "
          f"_int_gemm picks {'int8' if quant.cpu_int8_gemm_is_fast() else 'fp32'} here")
    print(f"{'shape':<20} {'_int_mm ms':>11} {'fp32 mm ms':>11} {'int8/fp32':>10}")
    tiny = [("tiny qkvo", 256, 256), ("tiny gate/up", 704, 256), ("tiny down", 256, 704)]
    for name, out_f, in_f in tiny + SHAPES:
        xq = torch.randint(-128, 128, (tokens, in_f), dtype=torch.int8)
        wq = torch.randint(-1, 2, (out_f, in_f), dtype=torch.int8)
        forms = (lambda: quant._int_gemm(xq, wq, int8=True), lambda: quant._int_gemm(xq, wq, int8=False))
        if not torch.equal(forms[0](), forms[1]()):
            raise SystemExit(f"the two products differ at {name}")
        i, f32 = alternated_medians(forms, repeats)
        print(f"{name:<20} {i * 1e3:>11.2f} {f32 * 1e3:>11.2f} {i / f32:>9.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512, help="tokens per step (batch x sequence)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--exactness", action="store_true", help="print the bf16-autocast exactness table and exit")
    ap.add_argument("--act-scale", action="store_true", help="time the two exact forms of the per-token max|x| and exit")
    ap.add_argument("--int-gemm", action="store_true", help="time the int8 and fp32 exact products and exit")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.exactness:
        exactness(args.tokens)
        return
    if args.int_gemm:
        int_gemm_forms(args.tokens, args.repeats)
        return
    if args.act_scale:
        act_scale_forms(args.tokens, args.repeats)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {args.tokens} tokens, "
          f"median of {args.repeats}")
    print(f"{'shape':<20} {'nn.Linear ms':>13} {'BitLinear ms':>13} {'ratio':>7}")
    ratios = []
    for name, out_f, in_f in SHAPES:
        lin = nn.Linear(in_f, out_f, bias=False)
        bit = BitLinear.from_linear(lin, backend="torch")
        x = torch.randn(args.tokens, in_f, requires_grad=True)
        g = torch.randn(args.tokens, out_f)
        for _ in range(2):  # warm up
            step(lin, x, g)
            step(bit, x, g)
        tl, tb = [], []
        for _ in range(args.repeats):
            tl.append(timed(lin, x, g))
            tb.append(timed(bit, x, g))
        ml, mb = statistics.median(tl), statistics.median(tb)
        ratios.append(mb / ml)
        print(f"{name:<20} {ml * 1e3:>13.1f} {mb * 1e3:>13.1f} {mb / ml:>6.2f}x")
    print(f"geometric mean ratio BitLinear / nn.Linear: {statistics.geometric_mean(ratios):.2f}x")


if __name__ == "__main__":
    main()
