"""Pretraining data: text files (``.txt``, ``.jsonl``) read as a stream, tokenized, packed.

``data.path`` is a file, a directory (every ``*.txt``/``*.jsonl``/``*.json`` below it, sorted),
a glob (``corpus/*.jsonl``) or ``builtin:pydoc`` (CPython's ``pydoc_data.topics`` help texts —
a few hundred KB of English shipped with Python, so the tiny recipe needs no download).

Documents are tokenized, joined with EOS and cut into blocks of ``seq_len + 1`` tokens. Every
``period``-th block of the stream (``period = round(1 / val_fraction)``) is held out for
validation; the rest go through a seeded shuffle buffer. The order depends only on the files and
the seed, so a position — (epoch, blocks taken this epoch) — identifies where training stands;
resuming replays the stream up to it, neither repeating nor skipping a block.

A ``.txt`` file is one document (read in line chunks, never whole); in a ``.jsonl`` file each
line is an object whose ``text`` field (``data.text_field``) is one document.
"""

from __future__ import annotations

import glob
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

BUILTIN_PYDOC = "builtin:pydoc"
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
_CHUNK_CHARS = 1 << 16
SHUFFLE_BUFFER = 1024


@dataclass
class DataConfig:
    path: str = field(metadata={"help": "file, directory, glob, or builtin:pydoc"})
    tokenizer: str = field(
        default="bpe:4096",
        metadata={"help": "transformers tokenizer name/path, or bpe:<vocab_size> to train one on the data"},
    )
    seq_len: int = field(default=256, metadata={"min": 8, "help": "tokens per training sequence"})
    val_fraction: float = field(default=0.02, metadata={"min": 0.0, "max": 0.5, "help": "share of blocks held out"})
    text_field: str = field(default="text", metadata={"help": "the text key of .jsonl records"})

    def validate(self):
        if self.tokenizer.startswith("bpe:"):
            n = self.tokenizer[4:]
            if not n.isdigit() or int(n) < 260:
                raise _recipe_error()(f"data.tokenizer {self.tokenizer!r}: expected bpe:<vocab_size> with vocab_size >= 260")


def _recipe_error():
    from .recipe import RecipeError

    return RecipeError


class DataError(ValueError):
    """Input data that cannot be used; the message names the file."""


# ----------------------------------------------------------------------------- sources


def resolve_files(spec: str) -> list[Path] | str:
    """The files ``spec`` names (sorted), or ``BUILTIN_PYDOC``. Errors when nothing matches."""
    if spec == BUILTIN_PYDOC:
        return BUILTIN_PYDOC
    if spec.startswith("builtin:"):
        raise DataError(f"data.path {spec!r}: unknown built-in corpus; the only one is {BUILTIN_PYDOC!r}")
    p = Path(os.path.expanduser(spec))
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"data.path {spec!r}: directory holds no {'/'.join(TEXT_SUFFIXES)} files")
    elif glob.has_magic(spec):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(spec), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"data.path {spec!r}: the pattern matches no files")
    else:
        raise DataError(f"data.path {spec!r}: no such file or directory")
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"{f}: file is empty")
    return files


def _pydoc_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            yield text


def _txt_pieces(path: Path) -> Iterator[tuple[str, bool]]:
    """(piece, last) chunks of one text file, split at line ends."""
    buf: list[str] = []
    size = 0
    any_text = False
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for line in f:
                buf.append(line)
                size += len(line)
                if size >= _CHUNK_CHARS:
                    any_text = True
                    yield "".join(buf), False
                    buf, size = [], 0
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte offset {e.start} of a read chunk): {e.reason}") from None
    if buf or any_text:
        yield "".join(buf), True
    else:
        raise DataError(f"{path}: file holds no text")


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    n = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or field not in obj:
                    raise DataError(f"{path}:{lineno}: expected an object with a {field!r} field")
                text = obj[field]
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: field {field!r} is not a string")
                n += 1
                if text:
                    yield text
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8: {e.reason}") from None
    if n == 0:
        raise DataError(f"{path}: no JSON lines with text")


def iter_pieces(spec: str, text_field: str = "text") -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of the whole corpus, in a fixed order."""
    files = resolve_files(spec)
    if files == BUILTIN_PYDOC:
        for doc in _pydoc_documents():
            yield doc, True
        return
    for f in files:
        if f.suffix in (".jsonl", ".json"):
            for doc in _jsonl_documents(f, text_field):
                yield doc, True
        else:
            yield from _txt_pieces(f)


def iter_documents(spec: str, text_field: str = "text", max_chars: int | None = None) -> Iterator[str]:
    """Texts of the corpus (a txt file's chunks count as texts), up to ``max_chars`` in all."""
    total = 0
    for text, _ in iter_pieces(spec, text_field):
        if max_chars is not None and total >= max_chars:
            return
        total += len(text)
        yield text


# ----------------------------------------------------------------------------- packing


def iter_blocks(spec: str, tokenizer, block: int, text_field: str = "text", batch: int = 8) -> Iterator[list[int]]:
    """Token blocks of length ``block``: documents tokenized, each followed by EOS, packed."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to join documents with")
    buf: list[int] = []
    pending: list[tuple[str, bool]] = []

    def flush():
        ids = tokenizer([t for t, _ in pending], add_special_tokens=False)["input_ids"]
        for toks, (_, end) in zip(ids, pending):
            buf.extend(toks)
            if end:
                buf.append(eos)
        pending.clear()

    pos = 0
    for piece in iter_pieces(spec, text_field):
        pending.append(piece)
        if len(pending) >= batch:
            flush()
            while len(buf) - pos >= block:
                yield buf[pos : pos + block]
                pos += block
            del buf[:pos]
            pos = 0
    if pending:
        flush()
    while len(buf) - pos >= block:
        yield buf[pos : pos + block]
        pos += block


@dataclass
class DataPosition:
    epoch: int = 0
    taken: int = 0  # training blocks yielded in this epoch

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken}

    @classmethod
    def from_dict(cls, d: dict) -> "DataPosition":
        return cls(int(d["epoch"]), int(d["taken"]))


class PackedData:
    """Train/validation blocks of one corpus, deterministic given the seed."""

    def __init__(self, spec: str, tokenizer, seq_len: int, val_fraction: float, seed: int, text_field: str = "text",
                 rank: int = 0, world_size: int = 1):
        self.spec, self.tok, self.block = spec, tokenizer, seq_len + 1
        self.seed, self.text_field = seed, text_field
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size = rank, world_size
        self.period = max(2, round(1.0 / val_fraction)) if val_fraction > 0 else 0
        resolve_files(spec)  # fail early on a bad path

    def _is_val(self, i: int) -> bool:
        return bool(self.period) and i % self.period == self.period - 1

    def validation(self, n: int) -> list[list[int]]:
        """The first ``n`` held-out blocks (fewer if the corpus is small)."""
        out: list[list[int]] = []
        if n <= 0 or not self.period:
            return out
        for i, b in enumerate(iter_blocks(self.spec, self.tok, self.block, self.text_field)):
            if self._is_val(i):
                out.append(b)
                if len(out) >= n:
                    break
        return out

    def _epoch_stream(self, epoch: int) -> Iterator[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        buf: list[list[int]] = []
        for i, b in enumerate(iter_blocks(self.spec, self.tok, self.block, self.text_field)):
            if self._is_val(i):
                continue
            if len(buf) < SHUFFLE_BUFFER:
                buf.append(b)
                continue
            j = rng.randrange(len(buf))
            yield buf[j]
            buf[j] = b
        rng.shuffle(buf)
        yield from buf

    def train_blocks(self, pos: DataPosition) -> Iterator[list[int]]:
        """Training blocks from ``pos`` on, forever (epoch after epoch); updates ``pos`` in place
        as each block is handed out. With ``world_size > 1`` every rank walks the same seeded
        stream and keeps every ``world_size``-th block (offset ``rank``), so ranks never share a
        block; ``pos.taken`` counts blocks of the whole stream, so it is the same on every rank."""
        skip = pos.taken
        while True:
            n = 0
            for b in self._epoch_stream(pos.epoch):
                n += 1
                if n <= skip:
                    continue
                pos.taken = n
                if (n - 1) % self.world_size != self.rank:
                    continue
                yield b
            if n == 0:
                raise DataError(
                    f"data.path {self.spec!r}: too little text for one training block of {self.block} tokens"
                )
            if skip > n:
                raise DataError(f"saved data position {pos.taken} is past the end of epoch {pos.epoch} ({n} blocks); did the data change?")
            pos.epoch += 1
            pos.taken = 0
            skip = 0


def open_training_data(cfg: DataConfig, tokenizer, seed: int, rank: int = 0, world_size: int = 1) -> PackedData:
    """The training data a recipe's ``data`` section describes, as seen by one rank: an object
    with ``validation(n)`` and ``train_blocks(pos)``. The one entry point the loop uses."""
    return PackedData(cfg.path, tokenizer, cfg.seq_len, cfg.val_fraction, seed, cfg.text_field,
                      rank=rank, world_size=world_size)


def register(sub) -> None:
    """No subcommand yet (``tokenize`` is planned)."""
    return None
