"""The ``bitnet-train`` command line.

Each subcommand lives with the code it drives; a module registers its subcommands through a
``register(subparsers)`` function. Modules keep their top-level imports light (no trl, triton,
gguf or llama_cpp at import time) so that ``bitnet-train --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from bitnet_train.errors import USER_ERRORS
from bitnet_train.progress import library_bars_off

# (module, what it provides) — in the order shown by --help
COMMAND_MODULES = [
    "bitnet_train.commands",  # init, info
    "bitnet_train.training.pretrain",  # pretrain
    "bitnet_train.data.config",  # tokenize
    "bitnet_train.align",  # sft, dpo
    "bitnet_train.modeling.convert",  # convert
    "bitnet_train.export",  # export
    "bitnet_train.runtimes.generate",  # generate
    "bitnet_train.bench",  # bench
    "bitnet_train.evaluation.evaluate",  # eval
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitnet-train",
        description="Train 1.58-bit (ternary) BitNet language models and ship them to CPUs.",
    )
    from bitnet_train import __version__

    parser.add_argument("--version", action="version", version=f"bitnet-train {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:  # each must import: a broken one is an error, never a missing command
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        # --no-progress: no bar at all, the libraries' included, also in the processes a command starts
        quiet = getattr(args, "no_progress", False)
        with library_bars_off(everywhere=True) if quiet else contextlib.nullcontext():
            rc = args.func(args)
    except USER_ERRORS as e:
        print(f"bitnet-train {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bitnet-train {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
