#!/usr/bin/env python3
"""The arithmetic of ``bitnet_train.quant`` on the CPU: forms of one computation that must agree bit for
bit, timed against each other in one process (``bench_harness.alternated_medians``), and the exactness
of BitLinear's product under bf16 autocast. The speed of a whole BitLinear training step against
``nn.Linear`` is ``scripts/bench_train_step.py`` (``--device cpu --modes fp32``).

    python scripts/bench_quant.py exactness [--tokens 64]
    python scripts/bench_quant.py act-scale [--tokens 512] [--repeats 7] [--threads N]
    python scripts/bench_quant.py int-gemm  [--tokens 512] [--repeats 7] [--threads N]

``exactness``: for 2B4T's projection shapes under CPU bf16 autocast, the share of outputs equal to the
exact integer product rounded once to bf16, for BitLinear and for the fake-quant path (``F.linear`` on
the dequantized operands, what BitLinear ran before its exact int8 product).

``act-scale``: the per-token ``max|x|`` of :func:`bitnet_train.quant.act_scale` in its two exact forms,
``x.abs().amax(-1)`` (what it uses) and ``torch.linalg.vector_norm(x, inf, -1)`` (what it used before,
which avoids the ``|x|`` temporary), on ``--tokens`` x each input width.

``int-gemm``: the two exact products of :func:`bitnet_train.quant._int_gemm`, ``torch._int_mm`` (int8 x
int8 -> int32) against the fp32 ``mm`` of the same integer operands, on the tiny preset's and 2B4T's
shapes, and which one ``_int_gemm`` picks on this CPU (:func:`bitnet_train.quant.cpu_int8_gemm_is_fast`).
"""

from __future__ import annotations

import argparse

import torch

from bench_harness import alternated_medians, machine_line
from bitnet_train import quant
from bitnet_train.layers.bitlinear import BitLinear

SHAPES = [  # (name, out_features, in_features) of 2B4T's projections
    ("q/o 2560x2560", 2560, 2560),
    ("k/v 640x2560", 640, 2560),
    ("gate/up 6912x2560", 6912, 2560),
    ("down 2560x6912", 2560, 6912),
]


def exactness(args) -> None:
    print(f"CPU bf16 autocast, {args.tokens} tokens: share of outputs equal to the exact int8 x ternary product "
          "rounded once to bf16 (relative difference, norm of the error over norm of the exact output)")
    print(f"{'shape':<20} {'BitLinear':>18} {'fake-quant F.linear':>22}")
    for name, out_f, in_f in SHAPES:
        bit = BitLinear(in_f, out_f, backend="torch")
        x = torch.randn(args.tokens, in_f)
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


def act_scale(args) -> None:
    print(f"fp32, {args.tokens} tokens, median of {args.repeats}")
    print(f"{'input width':<12} {'abs().amax us':>14} {'vector_norm(inf) us':>20} {'ratio':>7}")
    for k in sorted({in_f for _, _, in_f in SHAPES}):
        x = torch.randn(args.tokens, k)
        forms = (lambda: x.abs().amax(dim=-1, keepdim=True),
                 lambda: torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True))
        if not torch.equal(forms[0](), forms[1]()):
            raise SystemExit(f"the two forms of max|x| differ at width {k}")
        a, v = alternated_medians(forms, args.repeats, inner=10)
        print(f"{k:<12} {a * 1e6:>14.0f} {v * 1e6:>20.0f} {v / a:>6.1f}x")


def int_gemm(args) -> None:
    print(f"{args.tokens} tokens, median of {args.repeats}; _int_gemm picks "
          f"{'int8' if quant.cpu_int8_gemm_is_fast() else 'fp32'} here")
    print(f"{'shape':<20} {'_int_mm ms':>11} {'fp32 mm ms':>11} {'int8/fp32':>10}")
    tiny = [("tiny qkvo", 256, 256), ("tiny gate/up", 704, 256), ("tiny down", 256, 704)]
    for name, out_f, in_f in tiny + SHAPES:
        xq = torch.randint(-128, 128, (args.tokens, in_f), dtype=torch.int8)
        wq = torch.randint(-1, 2, (out_f, in_f), dtype=torch.int8)
        forms = (lambda: quant._int_gemm(xq, wq, int8=True), lambda: quant._int_gemm(xq, wq, int8=False))
        if not torch.equal(forms[0](), forms[1]()):
            raise SystemExit(f"the two products differ at {name}")
        i, f32 = alternated_medians(forms, args.repeats)
        print(f"{name:<20} {i * 1e3:>11.2f} {f32 * 1e3:>11.2f} {i / f32:>9.2f}x")


COMMANDS = {"exactness": (exactness, 64), "act-scale": (act_scale, 512), "int-gemm": (int_gemm, 512)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=list(COMMANDS))
    ap.add_argument("--tokens", type=int, default=None, help="rows of the input (default: 64 for exactness, else 512)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    fn, tokens = COMMANDS[args.what]
    args.tokens = args.tokens or tokens
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine_line())
    fn(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
