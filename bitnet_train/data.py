"""Pretraining data: local files or hub datasets read as a stream, tokenized, packed — or a
corpus pre-tokenized by ``bitnet-train tokenize`` (see :mod:`bitnet_train.shards`).

``data.path`` is one of:

* a file, a directory (every ``*.txt``/``*.jsonl``/``*.json``/``*.parquet``/``*.arrow`` below it,
  sorted; hidden files and the metadata ``datasets``' ``save_to_disk`` writes are left out) or a
  glob (``corpus/*.parquet``);
* ``hf:<dataset>[:<config>]``: a dataset read through ``datasets.load_dataset(..., streaming=True)``
  (split ``data.split``); ``<dataset>`` is a hub name or a local dataset directory;
* ``builtin:pydoc``: CPython's ``pydoc_data.topics`` help texts — a few hundred KB of English
  shipped with Python, so the tiny recipe needs no download;
* a directory written by ``bitnet-train tokenize`` (it holds ``index.json``): token shards read
  with random access (:class:`bitnet_train.shards.ShardData`).

Nothing is loaded whole: a ``.txt`` file is one document read in line chunks; in a ``.jsonl``
file each line is an object whose ``data.text_field`` is one document; ``.parquet`` files are read
a record batch at a time (only the text column); ``.arrow`` files (Arrow IPC, file or stream
format — what ``datasets`` writes to its cache and ``save_to_disk``) are memory-mapped and read a
record batch at a time. Records whose text is null are skipped and counted; a missing text
field/column, invalid UTF-8, an empty file or a path that matches nothing is a :class:`DataError`
naming the file.

Documents are tokenized, joined with EOS and cut into blocks of ``seq_len + 1`` tokens. Every
``period``-th block of the stream (``period = round(1 / val_fraction)``) is held out for
validation; the rest go through a seeded shuffle buffer. The order depends only on the data and
the seed, so a position — (epoch, blocks taken this epoch) — identifies where training stands;
resuming replays the stream up to it, neither repeating nor skipping a block.

Ranks: every rank walks the same seeded block stream and, in each round of ``world_size``
consecutive blocks, keeps the block at its own offset, so no two ranks train on the same block;
the position counts blocks of the whole stream and is the same on every rank. An incomplete last
round of an epoch is dropped, so ranks always change epoch together.
"""

from __future__ import annotations

import glob
import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import DataError, RecipeError

BUILTIN_PYDOC = "builtin:pydoc"
HF_PREFIX = "hf:"
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
TABLE_SUFFIXES = (".parquet", ".arrow")
DATA_SUFFIXES = TEXT_SUFFIXES + TABLE_SUFFIXES
# what datasets' save_to_disk writes next to its .arrow files: not documents
DATASETS_METADATA = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})
_CHUNK_CHARS = 1 << 16
_TABLE_BATCH = 1024
SHUFFLE_BUFFER = 1024
PREFETCH_BLOCKS = 64  # blocks the streaming reader prepares ahead, in a background thread
BPE_SAMPLE_CHARS = 8_000_000


@dataclass
class DataConfig:
    path: str = field(metadata={"help": "file, directory, glob, hf:<dataset>[:<config>], builtin:pydoc, or a tokenized directory"})
    tokenizer: str = field(
        default="bpe:4096",
        metadata={"help": "transformers tokenizer name/path, or bpe:<vocab_size> to train one on the data"},
    )
    seq_len: int = field(default=256, metadata={"min": 8, "help": "tokens per training sequence"})
    val_fraction: float = field(default=0.02, metadata={"min": 0.0, "max": 0.5, "help": "share of blocks held out"})
    text_field: str = field(default="text", metadata={"help": "the text field of .jsonl records / column of parquet, arrow and hf: data"})
    split: str = field(default="train", metadata={"help": "split of an hf: dataset"})

    def validate(self):
        if self.tokenizer.startswith("bpe:"):
            n = self.tokenizer[4:]
            if not n.isdigit() or int(n) < 260:
                raise RecipeError(f"data.tokenizer {self.tokenizer!r}: expected bpe:<vocab_size> with vocab_size >= 260")
        if self.path.startswith(HF_PREFIX):
            try:
                parse_hf_spec(self.path)  # syntax only: nothing is fetched before training starts
            except DataError as e:
                raise RecipeError(str(e)) from None
        if not self.text_field:
            raise RecipeError("data.text_field: must not be empty")


# ----------------------------------------------------------------------------- sources


def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """``hf:name[:config]`` → (name, config). Raises DataError on a malformed spec."""
    rest = spec[len(HF_PREFIX):]
    name, config = rest, None
    if ":" in rest:
        head, tail = rest.rsplit(":", 1)
        if tail and "/" not in tail and head:
            name, config = head, tail
    if not name or name.strip() != name:
        raise DataError(f"data.path {spec!r}: expected hf:<dataset>[:<config>]")
    return name, config


def resolve_files(spec: str) -> list[Path] | str:
    """The files ``spec`` names (sorted), or ``spec`` itself for ``builtin:pydoc`` and ``hf:...``
    (checked for syntax only). Errors when nothing matches."""
    if spec == BUILTIN_PYDOC:
        return BUILTIN_PYDOC
    if spec.startswith(HF_PREFIX):
        parse_hf_spec(spec)
        return spec
    if spec.startswith("builtin:"):
        raise DataError(f"data.path {spec!r}: unknown built-in corpus; the only one is {BUILTIN_PYDOC!r}")
    p = Path(os.path.expanduser(spec))
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES
                       and f.name not in DATASETS_METADATA and not f.name.startswith("."))
        if not files:
            raise DataError(f"data.path {spec!r}: directory holds no {'/'.join(DATA_SUFFIXES)} files")
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


class SkipCounter:
    """Records skipped because their text is null, per source."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, where: str, n: int = 1) -> None:
        if n:
            self.counts[where] = self.counts.get(where, 0) + n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> str:
        return "; ".join(f"{w}: {n} record(s) with null text skipped" for w, n in self.counts.items())


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


def _jsonl_documents(path: Path, field: str, skips: SkipCounter | None = None) -> Iterator[str]:
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
                n += 1
                if text is None:
                    if skips is not None:
                        skips.add(str(path))
                    continue
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: field {field!r} is not a string")
                if text:
                    yield text
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8: {e.reason}") from None
    if n == 0:
        raise DataError(f"{path}: no JSON lines with text")


def _check_text_column(schema, field: str, where: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        raise DataError(f"{where}: no column {field!r} (columns: {', '.join(schema.names)}); set data.text_field")
    t = schema.field(field).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
        raise DataError(f"{where}: column {field!r} holds {t}, not text")


def _batch_texts(batch, field: str, where: str, skips: SkipCounter | None) -> Iterator[str]:
    col = batch.column(batch.schema.get_field_index(field))
    if col.null_count and skips is not None:
        skips.add(where, col.null_count)
    for text in col.to_pylist():
        if text:
            yield text


def _parquet_documents(path: Path, field: str, skips: SkipCounter | None = None) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    _check_text_column(pf.schema_arrow, field, str(path))
    try:
        for batch in pf.iter_batches(batch_size=_TABLE_BATCH, columns=[field]):
            yield from _batch_texts(batch, field, str(path), skips)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: corrupt Parquet data ({e})") from None


def _arrow_documents(path: Path, field: str, skips: SkipCounter | None = None) -> Iterator[str]:
    """An Arrow IPC file (random-access format) or stream (``datasets``' cache format)."""
    import pyarrow as pa

    source = pa.memory_map(str(path), "r")
    try:
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid as e:
                raise DataError(f"{path}: not an Arrow IPC file or stream ({e})") from None
            batches = iter(reader)
        _check_text_column(reader.schema, field, str(path))
        try:
            for batch in batches:
                yield from _batch_texts(batch, field, str(path), skips)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: corrupt Arrow data ({e})") from None
    finally:
        source.close()


def _arrow_schema(path: Path):
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as source:
        try:
            return pa.ipc.open_file(source).schema
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                return pa.ipc.open_stream(source).schema
            except pa.ArrowInvalid as e:
                raise DataError(f"{path}: not an Arrow IPC file or stream ({e})") from None


def check_table_schemas(files: list[Path], field: str) -> None:
    """Before any training: every parquet/arrow file has a text column ``field`` (footers and
    schemas only; nothing else is read)."""
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                schema = pq.read_schema(f)
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{f}: not a readable Parquet file ({e})") from None
            _check_text_column(schema, field, str(f))
        elif f.suffix == ".arrow":
            _check_text_column(_arrow_schema(f), field, str(f))


def _hf_documents(spec: str, field: str, split: str, skips: SkipCounter | None = None) -> Iterator[str]:
    """Texts of a ``datasets`` dataset, streamed (``load_dataset(..., streaming=True)``)."""
    import datasets

    name, config = parse_hf_spec(spec)
    where = f"{spec} (split {split!r})"
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # datasets raises many types (hub, builder, split errors)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data.path {spec!r}: cannot open the dataset (split {split!r}): {msg}") from None
    features = getattr(ds, "features", None)
    if features is not None:
        if field not in features:
            raise DataError(f"{where}: no field {field!r} (fields: {', '.join(features)}); set data.text_field")
        ds = ds.select_columns([field])
    n = 0
    for i, ex in enumerate(ds):
        if field not in ex:
            raise DataError(f"{where}: record {i} has no field {field!r} (fields: {', '.join(ex)}); set data.text_field")
        text = ex[field]
        n += 1
        if text is None:
            if skips is not None:
                skips.add(where)
            continue
        if not isinstance(text, str):
            raise DataError(f"{where}: record {i}: field {field!r} is {type(text).__name__}, not text")
        if text:
            yield text
    if n == 0:
        raise DataError(f"{where}: the split is empty")


def iter_pieces(spec: str, text_field: str = "text", split: str = "train",
                skips: SkipCounter | None = None) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of the whole corpus, in a fixed order."""
    files = resolve_files(spec)
    if files == BUILTIN_PYDOC:
        for doc in _pydoc_documents():
            yield doc, True
        return
    if isinstance(files, str):  # hf:
        for doc in _hf_documents(spec, text_field, split, skips):
            yield doc, True
        return
    for f in files:
        if f.suffix in (".jsonl", ".json"):
            docs = _jsonl_documents(f, text_field, skips)
        elif f.suffix == ".parquet":
            docs = _parquet_documents(f, text_field, skips)
        elif f.suffix == ".arrow":
            docs = _arrow_documents(f, text_field, skips)
        else:
            yield from _txt_pieces(f)
            continue
        for doc in docs:
            yield doc, True


def iter_documents(spec: str, text_field: str = "text", max_chars: int | None = None, split: str = "train") -> Iterator[str]:
    """Texts of the corpus (a txt file's chunks count as texts), up to ``max_chars`` in all."""
    total = 0
    for text, _ in iter_pieces(spec, text_field, split):
        if max_chars is not None and total >= max_chars:
            return
        total += len(text)
        yield text


def make_tokenizer(cfg: DataConfig):
    """The tokenizer a recipe's ``data`` section names: ``bpe:<n>`` trains a byte-level BPE on (up
    to 8 MB of) the data; anything else is a transformers name or path. For a tokenized directory
    it is the tokenizer saved there (after checking it matches ``data.tokenizer``)."""
    from .shards import is_token_dir, tokenizer_for_token_dir
    from .tokenizer import load_tokenizer, train_bpe

    if is_token_dir(cfg.path):
        return tokenizer_for_token_dir(cfg.path, cfg.tokenizer)
    spec = cfg.tokenizer
    if spec.startswith("bpe:"):
        texts = iter_documents(cfg.path, cfg.text_field, max_chars=BPE_SAMPLE_CHARS, split=cfg.split)
        return train_bpe(texts, vocab_size=int(spec[4:]))
    return load_tokenizer(spec)


# ----------------------------------------------------------------------------- packing


def iter_piece_batches(spec: str, text_field: str = "text", split: str = "train", batch: int = 8,
                       skips: SkipCounter | None = None) -> Iterator[list[tuple[str, bool]]]:
    """The corpus's (text, ends_document) pieces, ``batch`` at a time."""
    pending: list[tuple[str, bool]] = []
    for piece in iter_pieces(spec, text_field, split, skips):
        pending.append(piece)
        if len(pending) >= batch:
            yield pending
            pending = []
    if pending:
        yield pending


def encode_pieces(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], int]:
    """(tokens, documents ended) of a batch of pieces tokenized together, EOS after each document."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to join documents with")
    ids = tokenizer([t for t, _ in pieces], add_special_tokens=False)["input_ids"]
    out: list[int] = []
    docs = 0
    for toks, (_, end) in zip(ids, pieces):
        out.extend(toks)
        if end:
            out.append(eos)
            docs += 1
    return out, docs


def iter_token_batches(spec: str, tokenizer, text_field: str = "text", split: str = "train", batch: int = 8,
                       skips: SkipCounter | None = None) -> Iterator[tuple[list[int], int]]:
    """The corpus as a token stream, in pieces: (tokens, documents ended) for every ``batch``
    texts tokenized together, each document followed by EOS."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to join documents with")
    for pieces in iter_piece_batches(spec, text_field, split, batch, skips):
        yield encode_pieces(tokenizer, pieces)


def iter_blocks(spec: str, tokenizer, block: int, text_field: str = "text", batch: int = 8, split: str = "train",
                skips: SkipCounter | None = None) -> Iterator[list[int]]:
    """Token blocks of length ``block``: documents tokenized, each followed by EOS, packed."""
    buf: list[int] = []
    for toks, _ in iter_token_batches(spec, tokenizer, text_field, split, batch, skips):
        buf.extend(toks)
        pos = 0
        while len(buf) - pos >= block:
            yield buf[pos : pos + block]
            pos += block
        del buf[:pos]


@dataclass
class DataPosition:
    epoch: int = 0
    taken: int = 0  # training blocks (of all ranks) handed out in this epoch

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken}

    @classmethod
    def from_dict(cls, d: dict) -> "DataPosition":
        return cls(int(d["epoch"]), int(d["taken"]))


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")


def held_out_period(val_fraction: float) -> int:
    """Every ``period``-th block (index ``period - 1`` of each group) is held out; 0 = none."""
    return max(2, round(1.0 / val_fraction)) if val_fraction > 0 else 0


class PackedData:
    """Train/validation blocks of one streamed corpus, deterministic given the seed."""

    def __init__(self, spec: str, tokenizer, seq_len: int, val_fraction: float, seed: int, text_field: str = "text",
                 rank: int = 0, world_size: int = 1, split: str = "train"):
        self.spec, self.tok, self.block = spec, tokenizer, seq_len + 1
        self.seed, self.text_field, self.split = seed, text_field, split
        check_rank(rank, world_size)
        self.rank, self.world_size = rank, world_size
        self.period = held_out_period(val_fraction)
        self.skips = SkipCounter()
        files = resolve_files(spec)  # fail early on a bad path
        if isinstance(files, list):
            check_table_schemas(files, text_field)

    def _blocks(self, skips: SkipCounter | None = None) -> Iterator[list[int]]:
        return iter_blocks(self.spec, self.tok, self.block, self.text_field, split=self.split, skips=skips)

    def _is_val(self, i: int) -> bool:
        return bool(self.period) and i % self.period == self.period - 1

    def validation(self, n: int) -> list[list[int]]:
        """The first ``n`` held-out blocks (fewer if the corpus is small); the same on every rank."""
        out: list[list[int]] = []
        if n <= 0 or not self.period:
            return out
        for i, b in enumerate(self._blocks()):
            if self._is_val(i):
                out.append(b)
                if len(out) >= n:
                    break
        return out

    def _epoch_stream(self, epoch: int) -> Iterator[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        buf: list[list[int]] = []
        skips = SkipCounter()
        for i, b in enumerate(self._blocks(skips)):
            if self._is_val(i):
                continue
            if len(buf) < SHUFFLE_BUFFER:
                buf.append(b)
                continue
            j = rng.randrange(len(buf))
            yield buf[j]
            buf[j] = b
        if skips.total and not self.skips.total:
            print(f"data: {skips.report()}", file=sys.stderr)
        self.skips = skips  # the counts of the last full pass
        rng.shuffle(buf)
        yield from buf

    def train_blocks(self, pos: DataPosition) -> Iterator[list[int]]:
        """Training blocks from ``pos`` on, forever (epoch after epoch); updates ``pos`` in place
        as each block is handed out. With ``world_size > 1`` the stream (from ``pos``) is cut into
        rounds of ``world_size`` blocks and each rank keeps the block at offset ``rank`` of every
        round, so ranks never share a block; ``pos.taken`` counts blocks of the whole stream up to
        the end of the current round, so it is the same on every rank."""
        skip = pos.taken
        w, r = self.world_size, self.rank
        while True:
            n = 0
            mine = None
            for b in prefetched(lambda e=pos.epoch: self._epoch_stream(e), PREFETCH_BLOCKS):
                n += 1
                if n <= skip:
                    continue
                k = (n - 1 - skip) % w
                if k == r:
                    mine = b
                if k == w - 1:  # the round is complete: every rank has its block
                    pos.taken = n
                    yield mine
                    mine = None
            if n == 0:
                raise DataError(
                    f"data.path {self.spec!r}: too little text for one training block of {self.block} tokens"
                )
            if skip > n:
                raise DataError(f"saved data position {skip} is past the end of epoch {pos.epoch} ({n} blocks); did the data change?")
            if skip == 0 and n < w:
                raise DataError(f"data.path {self.spec!r}: fewer training blocks ({n}) than ranks ({w})")
            pos.epoch += 1
            pos.taken = 0
            skip = 0


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


def prefetched(make_iter, depth: int) -> Iterator:
    """The items of ``make_iter()``, produced ``depth`` ahead by a background thread (reading and
    tokenizing overlap the training step's kernels, which run without the GIL). Same order;
    an exception in the producer is raised here; abandoning the iterator stops the thread."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item in make_iter():
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer
            put(_Raised(e))

    t = threading.Thread(target=run, name="bitnet-train-data", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()


def open_training_data(cfg: DataConfig, tokenizer, seed: int, rank: int = 0, world_size: int = 1):
    """The training data a recipe's ``data`` section describes, as seen by one rank: an object
    with ``validation(n)`` and ``train_blocks(pos)``. The one entry point the loop uses.

    A directory written by ``bitnet-train tokenize`` is read with random access
    (:class:`~bitnet_train.shards.ShardData`, after checking ``tokenizer`` is the one it was
    tokenized with); anything else is streamed (:class:`PackedData`)."""
    from .shards import ShardData, is_token_dir

    if is_token_dir(cfg.path):
        return ShardData(cfg.path, tokenizer, cfg.seq_len, cfg.val_fraction, seed, rank=rank, world_size=world_size)
    return PackedData(cfg.path, tokenizer, cfg.seq_len, cfg.val_fraction, seed, cfg.text_field,
                      rank=rank, world_size=world_size, split=cfg.split)


def register(sub) -> None:
    """``bitnet-train tokenize`` (implemented in :mod:`bitnet_train.shards`)."""
    from .shards import register_tokenize

    register_tokenize(sub)
