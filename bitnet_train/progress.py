"""The libraries' progress bars (transformers', the Hub's, datasets'): off for a while, then back as they were."""

from __future__ import annotations

import contextlib
import os
import sys

# the libraries' own switches for their bars, read when a process imports them
LIBRARY_BAR_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


@contextlib.contextmanager
def library_bars_off(everywhere: bool = False):
    """transformers' and the Hub's progress bars off in this process (transformers' "Loading weights",
    "Writing model shards", downloads). ``everywhere``: datasets' too, here and in the processes started
    meanwhile (through the libraries' environment switches). What was set before is restored."""
    from transformers.utils import logging as hf_logging

    saved = {k: os.environ.get(k) for k in LIBRARY_BAR_ENV}
    was_on = hf_logging.is_progress_bar_enabled()
    datasets = sys.modules.get("datasets") if everywhere else None  # imported later, it reads the variable
    ds_was_on = datasets is not None and datasets.is_progress_bar_enabled()
    if everywhere:
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
