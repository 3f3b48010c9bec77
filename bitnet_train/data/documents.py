"""The corpus as text: a ``data.path`` (file, directory, glob, ``hf:<dataset>``, ``builtin:pydoc``)
read as a stream of documents and tokenized in batches (the layer both data readers build on).

Nothing is loaded whole: a ``.txt`` file is one document read in line chunks; in a ``.jsonl``
file each line is an object whose ``data.text_field`` is one document; ``.parquet`` files are read
a record batch at a time (only the text column); ``.arrow`` files (Arrow IPC, file or stream
format) are memory-mapped and read a record batch at a time. Records whose text is null are
skipped and counted; a missing text field/column, invalid UTF-8, an empty file or a path that
matches nothing is a :class:`DataError` naming the file.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Iterator

from bitnet_train.errors import DataError

BUILTIN_PYDOC = "builtin:pydoc"
HF_PREFIX = "hf:"
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
TABLE_SUFFIXES = (".parquet", ".arrow")
DATA_SUFFIXES = TEXT_SUFFIXES + TABLE_SUFFIXES
# what datasets' save_to_disk writes next to its .arrow files: not documents
DATASETS_METADATA = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})
_CHUNK_CHARS = 1 << 16
_TABLE_BATCH = 1024


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


def jsonl_text(line: str, where: str, field: str, path, skips: SkipCounter | None) -> str | None:
    """The ``field`` text of one JSON line (``where`` names it in errors: FILE:LINE or FILE: line at
    byte N); None for a null field, counted as a skip."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or field not in obj:
        raise DataError(f"{where}: expected an object with a {field!r} field")
    text = obj[field]
    if text is None:
        if skips is not None:
            skips.add(str(path))
        return None
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is not a string")
    return text


def _jsonl_documents(path: Path, field: str, skips: SkipCounter | None = None) -> Iterator[str]:
    n = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                text = jsonl_text(line, f"{path}:{lineno}", field, path, skips)
                n += 1
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

