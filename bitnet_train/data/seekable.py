"""Seekable reading of a local corpus (the layer the streaming reader's lanes build on): the
corpus as units — its files in order, each counted in bytes (``.txt``, ``.jsonl``, ``.json``) or
records (``.parquet``, ``.arrow``), ``builtin:pydoc`` in documents — and its pieces read from any
unit on. A piece's cursor is the unit it starts at: reading from it gives that piece again;
reading from a unit that is not a line start skips to the next line."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from bitnet_train.data.documents import (jsonl_text, _CHUNK_CHARS, _TABLE_BATCH, BUILTIN_PYDOC, SkipCounter, _pydoc_documents,
                        check_table_schemas, resolve_files)
from bitnet_train.errors import DataError

class Source:
    """One file of a local corpus (or the built-in corpus): its kind and length in units."""

    def __init__(self, path: Path | None, kind: str, units: int, docs: list[str] | None = None):
        self.path, self.kind, self.units, self.docs = path, kind, units, docs

    def __repr__(self) -> str:
        return f"Source({self.path}, {self.kind}, {self.units})"


def _arrow_batches(path: Path):
    """(reader schema, a function giving the record batches from batch ``i`` on, row counts per batch)."""
    import pyarrow as pa

    source = pa.memory_map(str(path), "r")
    try:
        reader = pa.ipc.open_file(source)
        rows = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
        return reader.schema, (lambda i: (reader.get_batch(j) for j in range(i, len(rows)))), rows
    except pa.ArrowInvalid:
        pass
    source.seek(0)
    try:
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: not an Arrow IPC file or stream ({e})") from None
    batches = list(reader)  # memory-mapped: no copy
    return reader.schema, (lambda i: iter(batches[i:])), [b.num_rows for b in batches]


def corpus_sources(spec: str, field: str = "text") -> list[Source]:
    """The corpus ``spec`` (a local path or ``builtin:pydoc``; not ``hf:``) as sources with their
    lengths in units (file sizes, parquet footers and arrow batch headers: no text is read)."""
    files = resolve_files(spec)
    if files == BUILTIN_PYDOC:
        docs = list(_pydoc_documents())
        return [Source(None, "pydoc", len(docs), docs)]
    if isinstance(files, str):
        raise ValueError("hf: datasets have no unit cursor")
    check_table_schemas(files, field)
    out = []
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            out.append(Source(f, "parquet", pq.ParquetFile(f).metadata.num_rows))
        elif f.suffix == ".arrow":
            out.append(Source(f, "arrow", sum(_arrow_batches(f)[2])))
        else:
            out.append(Source(f, "jsonl" if f.suffix in (".jsonl", ".json") else "txt", f.stat().st_size))
    return out


def _lines_from(f, lo: int) -> int:
    """Position ``f`` at the first line that starts at or after byte ``lo``; returns that offset."""
    if lo > 0:
        f.seek(lo - 1)
        f.readline()
    return f.tell()


def _decode(path: Path, raw: bytes, at: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {at + e.start}): {e.reason}") from None


def _txt_range(s: Source, lo: int, hi: int):
    size = s.units
    with open(s.path, "rb") as f:
        pos = _lines_from(f, lo)
        buf: list[bytes] = []
        start = pos
        while pos < hi:
            line = f.readline()
            if not line:
                break
            if not buf:
                start = pos
            buf.append(line)
            pos += len(line)
            if pos - start >= _CHUNK_CHARS:
                yield _decode(s.path, b"".join(buf), start), pos >= size, start, pos
                buf = []
        if buf:
            yield _decode(s.path, b"".join(buf), start), pos >= size, start, pos


def _jsonl_range(s: Source, lo: int, hi: int, field: str, skips: SkipCounter | None):
    with open(s.path, "rb") as f:
        pos = _lines_from(f, lo)
        while pos < hi:
            line = f.readline()
            if not line:
                break
            start, pos = pos, pos + len(line)
            if not line.strip():
                continue
            text = jsonl_text(_decode(s.path, line, start), f"{s.path}: line at byte {start}", field, s.path, skips)
            if text:
                yield text, True, start, pos


def _rows_range(s: Source, lo: int, hi: int, field: str, skips: SkipCounter | None):
    import pyarrow as pa

    if s.kind == "pydoc":
        for i in range(lo, hi):
            yield s.docs[i], True, i, i + 1
        return
    if s.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(s.path)
        rows = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        g, row = 0, 0
        while g < len(rows) and row + rows[g] <= lo:
            row += rows[g]
            g += 1
        batches = pf.iter_batches(batch_size=_TABLE_BATCH, row_groups=list(range(g, len(rows))), columns=[field])
    else:
        _, from_batch, rows = _arrow_batches(s.path)
        g, row = 0, 0
        while g < len(rows) and row + rows[g] <= lo:
            row += rows[g]
            g += 1
        batches = from_batch(g)
    try:
        for batch in batches:
            n = batch.num_rows
            if row + n <= lo:
                row += n
                continue
            a, b = max(lo - row, 0), min(hi - row, n)
            col = batch.column(batch.schema.get_field_index(field)).slice(a, b - a)
            if col.null_count and skips is not None:
                skips.add(str(s.path), col.null_count)
            for i, text in enumerate(col.to_pylist()):
                if text:
                    yield text, True, row + a + i, row + a + i + 1
            row += n
            if row >= hi:
                return
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{s.path}: corrupt {s.kind} data ({e})") from None


def iter_unit_pieces(sources: list[Source], lo: int, hi: int, field: str = "text",
                     skips: SkipCounter | None = None) -> Iterator[tuple[str, bool, int, int]]:
    """(text, ends_document, cursor, next cursor) of the pieces that start in units ``[lo, hi)`` of
    the corpus, in order. ``cursor`` is where the piece starts: reading from it gives that piece
    again; ``next cursor`` is where the following piece may start."""
    base = 0
    for s in sources:
        a, b = max(lo - base, 0), min(hi - base, s.units)
        if a < b:
            if s.kind == "txt":
                it = _txt_range(s, a, b)
            elif s.kind == "jsonl":
                it = _jsonl_range(s, a, b, field, skips)
            else:
                it = _rows_range(s, a, b, field, skips)
            for text, end, c, n in it:
                yield text, end, base + c, (base + s.units if n >= s.units else base + n)
        base += s.units
        if base >= hi:
            return
