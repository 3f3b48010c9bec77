"""``bitnet-train bench``: benchmarks (GPU scripts that print measured ratios, not tests).

    bitnet-train bench kernels     # Triton kernels vs bf16 cuBLAS (bitnet_train/kernels/bench.py)

The arguments live in :mod:`bitnet_train.kernel_bench_args` (shared with ``python -m bitnet_train.kernels.bench``)
so that ``bitnet-train --help`` does not import Triton.
"""

from __future__ import annotations

from bitnet_train.kernel_bench_args import add_kernels_arguments


def cmd_kernels(args) -> int:
    from bitnet_train.kernels.bench import run

    return run(args)


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (need a CUDA GPU)")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    k = bsub.add_parser(
        "kernels",
        help="Triton ternary matmul vs bf16 F.linear (2B4T shapes, decode and prefill)",
        description="Times ternary_matmul (GEMV and tiled paths) against bf16 F.linear at 2B4T shapes, "
        "with achieved bandwidth / TOPS as a fraction of the H100/H200 peak. Needs a CUDA GPU. "
        "(One layer's training step: scripts/bench_train_step.py.)",
    )
    add_kernels_arguments(k)
    k.set_defaults(func=cmd_kernels)
    p.set_defaults(func=lambda args: p.print_help() or 2)
