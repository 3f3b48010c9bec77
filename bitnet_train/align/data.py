"""Alignment data: rows from a local file, glob or hub dataset, checked row by row (the first bad row
is named) and shaped the way TRL's SFT and DPO trainers read them."""

from __future__ import annotations

import glob as _glob
import json
from pathlib import Path

from bitnet_train.errors import AlignDataError
from bitnet_train.align.recipes import AlignDataConfig


_EXT = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(cfg: AlignDataConfig, split: str | None = None):
    """A ``datasets.Dataset`` from a local file/glob or a hub dataset."""
    from datasets import load_dataset

    split = split or cfg.split
    path = cfg.path
    local = [path] if Path(path).is_file() else sorted(_glob.glob(path)) if any(c in path for c in "*?[") else []
    if local:
        exts = {Path(p).suffix for p in local}
        if len(exts) != 1 or next(iter(exts)) not in _EXT:
            raise AlignDataError(f"data.path: {path!r}: files must all be one of {', '.join(_EXT)} (got {sorted(exts)})")
        if _EXT[next(iter(exts))] == "json":
            for f in local:
                _check_json_rows(Path(f))
        try:
            ds = load_dataset(_EXT[next(iter(exts))], data_files=local, split="train")
        except Exception as e:  # noqa: BLE001 - datasets wraps parser errors in DatasetGenerationError
            cause = e.__cause__ or e
            raise AlignDataError(f"data.path: cannot read {', '.join(local)}: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}") from None
    elif Path(path).suffix in _EXT or any(c in path for c in "*?[") or path.startswith((".", "/")):
        raise AlignDataError(f"data.path: no file matches {path!r}")
    else:
        try:
            ds = load_dataset(path, cfg.name, split=split)
        except Exception as e:  # noqa: BLE001 - hub / builder errors of many kinds
            raise AlignDataError(f"data.path: cannot load dataset {path!r} split {split!r}: {str(e).splitlines()[0]}") from None
    if cfg.max_rows is not None and split == cfg.split:
        ds = ds.select(range(min(cfg.max_rows, len(ds))))
    if len(ds) == 0:
        raise AlignDataError(f"data.path: {path!r} has no rows")
    return ds


def _check_json_rows(f: Path) -> None:
    """Every row of a .jsonl (or JSON-lines .json) file is a JSON object: the first bad line is
    named, as ``FILE:LINE``, before datasets sees the file."""
    if f.suffix == ".json":
        try:
            with open(f, encoding="utf-8") as fh:
                whole = json.load(fh)
            if isinstance(whole, (list, dict)):
                return  # one JSON document (a list of rows, or columns): datasets reads it
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # maybe JSON lines: checked line by line below
    try:
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise AlignDataError(f"{f}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise AlignDataError(f"{f}:{lineno}: expected a JSON object (one row), got {type(row).__name__}")
    except UnicodeDecodeError as e:
        raise AlignDataError(f"{f}: not valid UTF-8: {e.reason}") from None


def _is_messages(v) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in v)


def prepare_sft_rows(ds, where: str):
    """Keep ``messages`` (conversational) or ``prompt``/``completion``; check every row."""
    cols = set(ds.column_names)
    if "messages" in cols:
        ds = ds.select_columns(["messages"])

        def check(row, i):
            m = row["messages"]
            if not _is_messages(m):
                raise AlignDataError(f"{where}: row {i}: 'messages' must be a list of {{role, content}} mappings")
            if not any(x["role"] == "assistant" for x in m):
                raise AlignDataError(f"{where}: row {i}: 'messages' has no assistant message to train on")
        kind = "conversational"
    elif {"prompt", "completion"} <= cols:
        ds = ds.select_columns(["prompt", "completion"])

        def check(row, i):
            for k in ("prompt", "completion"):
                v = row[k]
                if not (isinstance(v, str) or _is_messages(v)) or (isinstance(v, str) and k == "completion" and not v):
                    raise AlignDataError(f"{where}: row {i}: '{k}' must be a non-empty string or a list of messages")
        kind = "prompt-completion"
    else:
        raise AlignDataError(
            f"{where}: SFT data needs a 'messages' column or 'prompt' and 'completion' columns; found {sorted(cols)}"
        )
    for i, row in enumerate(ds):
        check(row, i)
    return ds, kind


def prepare_dpo_rows(ds, where: str):
    """Keep ``prompt``/``chosen``/``rejected`` (strings or message lists); check every row.

    A conversational ``chosen``/``rejected`` that repeats a string ``prompt`` as its first user turn
    (HuggingFaceH4/ultrafeedback_binarized) is turned into an implicit prompt for TRL to extract."""
    cols = set(ds.column_names)
    missing = [c for c in ("chosen", "rejected") if c not in cols]
    if missing:
        raise AlignDataError(f"{where}: DPO data needs columns prompt, chosen, rejected; missing {', '.join(missing)} (found {sorted(cols)})")
    keep = [c for c in ("prompt", "chosen", "rejected") if c in cols]
    ds = ds.select_columns(keep)
    first = ds[0]
    if "prompt" not in cols and not _is_messages(first["chosen"]):
        raise AlignDataError(f"{where}: DPO data needs a 'prompt' column (or chosen/rejected as message lists that hold it)")
    for i, row in enumerate(ds):
        for k in keep:
            v = row[k]
            if v is None or (isinstance(v, str) and k != "prompt" and not v.strip()) or (isinstance(v, list) and not v):
                raise AlignDataError(f"{where}: row {i}: '{k}' is missing or empty")
            if not (isinstance(v, str) or _is_messages(v)):
                raise AlignDataError(f"{where}: row {i}: '{k}' must be a string or a list of {{role, content}} mappings")
        if isinstance(row["chosen"], str) != isinstance(row["rejected"], str):
            raise AlignDataError(f"{where}: row {i}: 'chosen' and 'rejected' must both be strings or both message lists")
    if "prompt" in keep and isinstance(first["prompt"], str) and _is_messages(first["chosen"]):
        def fix(row):
            c, r, p = row["chosen"], row["rejected"], row["prompt"]
            if c and c[0]["role"] == "user" and c[0]["content"] == p and r and r[0]["content"] == p:
                return {"chosen": c, "rejected": r}
            return {"chosen": [{"role": "user", "content": p}] + c, "rejected": [{"role": "user", "content": p}] + r}

        ds = ds.map(fix, remove_columns=["prompt"])
    return ds


def _split_eval(ds, cfg: AlignDataConfig, seed: int):
    if cfg.eval_rows:
        if cfg.eval_rows >= len(ds):
            raise AlignDataError(f"data.eval_rows {cfg.eval_rows} leaves no training rows (the data has {len(ds)})")
        parts = ds.train_test_split(test_size=cfg.eval_rows, seed=seed, shuffle=True)
        return parts["train"], parts["test"]
    return ds, None


def stage_datasets(recipe, prepare):
    cfg = recipe.data
    ds = prepare(load_rows(cfg), f"data.path {cfg.path!r}")
    ds = ds[0] if isinstance(ds, tuple) else ds
    train, ev = _split_eval(ds, cfg, recipe.seed)
    if cfg.eval_split:
        ev = prepare(load_rows(cfg, cfg.eval_split), f"data.eval_split {cfg.eval_split!r}")
        ev = ev[0] if isinstance(ev, tuple) else ev
    return train, ev
