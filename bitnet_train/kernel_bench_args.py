"""The arguments of the kernel benchmark, ``bitnet-train bench kernels`` and ``python -m bitnet_train.kernels.bench``,
and the 2B4T shapes it and ``scripts/bench_train_step.py`` time (a leaf, so that neither the CLI nor ``--help`` imports Triton)."""

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
