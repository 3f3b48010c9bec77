"""The ``bitnet-train`` command line.

Each subcommand lives with the code it drives; a module registers its subcommands through a
``register(subparsers)`` function. Modules keep their top-level imports light (no trl, triton,
gguf or llama_cpp at import time) so that ``bitnet-train --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from bitnet_train.errors import USER_ERRORS

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


# the libraries' own switches for their progress bars, read by the processes a command starts
LIBRARY_BAR_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


@contextlib.contextmanager
def library_bars(on: bool):
    """``--no-progress`` silences the libraries' progress bars too (transformers' "Loading weights",
    the Hub's downloads, datasets' maps), in this process and in those a command starts; what was set
    before is restored after the command."""
    if on:
        yield
        return
    from transformers.utils import logging as hf_logging

    saved = {k: os.environ.get(k) for k in LIBRARY_BAR_ENV}
    was_on = hf_logging.is_progress_bar_enabled()
    datasets = sys.modules.get("datasets")  # imported later, it reads the variable instead
    ds_was_on = datasets is not None and datasets.is_progress_bar_enabled()
    os.environ.update(dict.fromkeys(LIBRARY_BAR_ENV, "1"))
    hf_logging.disable_progress_bar()  # transformers' and the Hub's
    if datasets is not None:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if was_on:
            hf_logging.enable_progress_bar()
        if ds_was_on:
            datasets.enable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with library_bars(not getattr(args, "no_progress", False)):
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
