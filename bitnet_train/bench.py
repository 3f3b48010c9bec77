"""``bitnet-train bench``: benchmarks (GPU scripts that print measured ratios, not tests).

    bitnet-train bench kernels     # Triton kernels vs bf16 cuBLAS (bitnet_train/kernels/bench.py)

Argument definitions live here so that ``bitnet-train --help`` does not import Triton.
"""

from __future__ import annotations

SHAPES = [(2560, 2560), (640, 2560), (6912, 2560), (2560, 6912)]  # (out, in) of 2B4T's projections
TOKENS = [1, 16, 128, 2048]


def add_kernels_arguments(p) -> None:
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time in ms (default 25)")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time in ms (default 100)")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="token counts M, comma-separated (default %(default)s)")
    p.add_argument(
        "--shapes",
        default=",".join(f"{n}x{k}" for n, k in SHAPES),
        help="weight shapes OUTxIN, comma-separated (default: 2B4T's projections, %(default)s)",
    )
    p.add_argument("--train-tokens", type=int, default=4096, help="tokens per micro-batch of the training table (default 4096)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step table")


def cmd_kernels(args) -> int:
    from .kernels.bench import run

    return run(args)


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (need a CUDA GPU)")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    k = bsub.add_parser(
        "kernels",
        help="Triton ternary matmul vs bf16 F.linear (2B4T shapes, decode and prefill) and the BitLinear training step",
        description="Times ternary_matmul (GEMV and tiled paths) against bf16 F.linear at 2B4T shapes, "
        "with achieved bandwidth / TOPS as a fraction of the H100/H200 peak, and one BitLinear layer's "
        "forward+backward (triton and torch backends) against bf16 nn.Linear. Needs a CUDA GPU.",
    )
    add_kernels_arguments(k)
    k.set_defaults(func=cmd_kernels)
    p.set_defaults(func=lambda args: p.print_help() or 2)
