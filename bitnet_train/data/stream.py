"""The streaming reader: documents tokenized, joined with EOS and packed into blocks on the fly
(:class:`PackedData`), in lanes, with a background prefetch thread.

Lanes. The corpus is cut into ``data.lanes`` contiguous lanes (local files: equal shares of the
corpus's units — bytes of ``.txt``/``.jsonl``, records of ``.parquet``/``.arrow``, documents of
``builtin:pydoc``; ``hf:``: ``datasets.distributed.split_dataset_by_node(ds, lane, lanes)``). Each
lane is read, tokenized and packed on its own, in chunks of :data:`CHUNK_BLOCKS` blocks shuffled
with a generator seeded by (seed, lane, epoch, chunk); a lane that runs out drops its partial block
and starts its next epoch. The one global block order is lane ``k % lanes``'s next block for
``k = 0, 1, 2, ...``; rank ``r`` of ``world`` takes the blocks ``k ≡ r (mod world)``. So the order
does not depend on the world size, and rank ``r`` needs only the lanes ``≡ r (mod gcd(world,
lanes))``: with ``lanes`` a multiple of the world size each rank reads and tokenizes 1/world of the
corpus.

Position. A lane's state is its epoch, its chunk number, the cursor the chunk starts at (the unit
of the piece it starts in and the tokens of that piece already used; for ``hf:`` the dataset's
``state_dict()`` there) and the blocks of the chunk handed out. The checkpoint saves every lane's
state with ``taken`` (blocks of all ranks handed out); resuming seeks each lane to its chunk start
and re-reads at most one chunk: no replay from the start, at any world size.

Validation is whole documents, read once: the first ``data.val_tokens`` tokens of ``data.val_path``
(all of it when 0), or, without ``val_path``, the pieces at the start of lane 0 until
``val_tokens`` tokens are reached — never trained on (lane 0 starts after them). A ``.txt`` file is
one document (read in line chunks): there the held-out part is its first ``val_tokens`` tokens and
training starts at the next line.
"""

from __future__ import annotations

import math
import random
from typing import Iterator

from bitnet_train.data.block_order import DataPosition, check_rank
from bitnet_train.data.documents import HF_PREFIX, SkipCounter, encode_pieces, iter_piece_batches, parse_hf_spec, resolve_files
from bitnet_train.data.seekable import corpus_sources, iter_unit_pieces
from bitnet_train.errors import DataError
from bitnet_train.data.windows import Packer

CHUNK_BLOCKS = 64  # blocks a lane shuffles together (and re-reads, at most, on resume)
PREFETCH_BLOCKS = 64  # blocks the streaming reader prepares ahead, in a background thread
_TOKENIZE_BATCH = 8


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


class HeldOut:
    """Validation data: the packed windows (each ``seq_len + 1`` tokens but the last, which may be
    shorter; every token after the first predicted once), and the UTF-8 bytes of their text (None
    when unknown: a tokenized directory)."""

    def __init__(self, windows: list[list[int]], n_bytes: int | None, documents: int, tokens: int):
        self.windows, self.n_bytes, self.documents, self.tokens = windows, n_bytes, documents, tokens

    def __len__(self) -> int:
        return len(self.windows)


def pack_held_out(token_pieces, eos: int, seq_len: int, n_bytes: int | None, documents: int) -> HeldOut:
    """:class:`HeldOut` of a token stream given in pieces (EOS already after each document),
    packed as ``bitnet-train eval`` packs: ``EOS doc1 EOS doc2 EOS ...`` in windows of ``seq_len``
    predictions."""
    p = Packer(eos, seq_len)
    wins: list[list[int]] = []
    total = 0
    for toks in token_pieces:
        p.push(toks)
        total += len(toks)
        wins += p.windows()
    wins += p.rest()
    return HeldOut(wins, n_bytes, documents, total)


def held_out_documents(spec: str, tokenizer, seq_len: int, val_tokens: int, text_field: str = "text",
                       split: str = "train") -> HeldOut:
    """The validation set read from ``spec`` (``data.val_path``): its documents from the start,
    whole, until ``val_tokens`` tokens (all of them when 0)."""
    pieces, nbytes, docs, total = [], 0, 0, 0
    for batch in iter_piece_batches(spec, text_field, split, _TOKENIZE_BATCH):
        ids = tokenizer([t for t, _ in batch], add_special_tokens=False)["input_ids"]
        stop = False
        for (text, end), t in zip(batch, ids):
            t = list(t) + ([tokenizer.eos_token_id] if end else [])
            pieces.append(t)
            nbytes += len(text.encode("utf-8"))
            total += len(t)
            docs += int(end)
            if end and val_tokens and total >= val_tokens:
                stop = True
                break
        if stop:
            break
    if total == 0:
        raise DataError(f"data.val_path {spec!r}: no text to validate on")
    return pack_held_out(pieces, tokenizer.eos_token_id, seq_len, nbytes, docs)


class PackedData:
    """Train/validation blocks of one streamed corpus, deterministic given the seed (see the
    module docstring)."""

    def __init__(self, spec: str, tokenizer, seq_len: int, seed: int, text_field: str = "text",
                 rank: int = 0, world_size: int = 1, split: str = "train", val_tokens: int = 0,
                 val_path: str | None = None, lanes: int = 8):
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token to join documents with")
        check_rank(rank, world_size)
        if lanes < 1:
            raise ValueError(f"lanes {lanes}: must be at least 1")
        self.spec, self.tok, self.block, self.seq_len = spec, tokenizer, seq_len + 1, seq_len
        self.seed, self.text_field, self.split = seed, text_field, split
        self.rank, self.world_size, self.n_lanes = rank, world_size, lanes
        self.group = math.gcd(world_size, lanes)
        self.mine = [lane for lane in range(lanes) if lane % self.group == rank % self.group]
        self.skips = SkipCounter()
        self.hf = spec.startswith(HF_PREFIX)
        if self.hf:
            parse_hf_spec(spec)
            self.sources, self.units = None, 0
        else:
            self.sources = corpus_sources(spec, text_field)  # fails early on a bad path or schema
            self.units = sum(s.units for s in self.sources)
        self.val_tokens, self.val_path = val_tokens, val_path
        self._held_out = None
        self._start = {"s": None, "t": 0} if self.hf else {"u": 0, "t": 0}  # lane 0's first cursor
        self._started = bool(val_path) or val_tokens <= 0
        if val_path:
            resolve_files(val_path)

    @property
    def train_start(self):
        """Lane 0's first cursor: after the held-out pieces (read, once, on first use: constructing
        the reader opens nothing)."""
        if not self._started:
            self._held_out, self._start = self._held_out_from_stream()
            self._started = True
        return self._start

    # ------------------------------------------------------------------ validation

    def validation(self) -> HeldOut:
        """The held-out documents; the same on every rank and at any world size."""
        self.train_start  # noqa: B018 - reads the held-out pieces of the stream, if any
        if self._held_out is None:
            if self.val_path:
                self._held_out = held_out_documents(self.val_path, self.tok, self.seq_len, self.val_tokens,
                                                    self.text_field, self.split)
            else:
                self._held_out = HeldOut([], None, 0, 0)
        return self._held_out

    def _held_out_from_stream(self):
        """The held-out pieces at the start of the corpus, and the cursor training starts at: whole
        documents until ``val_tokens``; a ``.txt`` chunk (not a document end) is cut at ``val_tokens``."""
        pieces, nbytes, docs, total, start = [], 0, 0, 0, dict(self._start)
        for batch in self._batches(self._lane_pieces(0, start, hi=self.units)):
            for (text, end, c, n), t in zip(batch, self._encode(batch)):
                need = self.val_tokens - total
                if len(t) > need and self._is_txt(c):  # inside a .txt file: training starts at the next line
                    offsets = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
                    pieces.append(t[:need])
                    held = len(text[: offsets[need - 1][1]].encode("utf-8"))
                    nbytes += held
                    total += need
                    start = self._cursor(c + held)  # not a line start: reading skips to the next one
                    break
                pieces.append(t)
                nbytes += len(text.encode("utf-8"))
                total += len(t)
                docs += int(end)
                start = self._cursor(n)
                if total >= self.val_tokens:
                    break
            if total >= self.val_tokens:
                break
        if total == 0:
            raise DataError(f"data.path {self.spec!r}: no text to hold out for validation")
        return pack_held_out(pieces, self.tok.eos_token_id, self.seq_len, nbytes, docs), start

    def _is_txt(self, unit) -> bool:
        """Whether the piece at cursor ``unit`` is from a .txt file (one document per file)."""
        if self.hf:
            return False
        base = 0
        for src in self.sources:
            if unit < base + src.units:
                return src.kind == "txt"
            base += src.units
        return False

    # ------------------------------------------------------------------ lanes

    def _lane_range(self, lane: int) -> tuple[int, int]:
        lo = self.train_start["u"]
        n = self.units - lo
        return lo + lane * n // self.n_lanes, lo + (lane + 1) * n // self.n_lanes

    def _lane_cursor(self, lane: int) -> dict:
        """The cursor a lane's epoch starts at (lane 0: after the held-out pieces)."""
        if lane == 0:
            return dict(self.train_start)
        return {"s": None, "t": 0} if self.hf else {"u": self._lane_range(lane)[0], "t": 0}

    def _hf_lane(self, lane: int):
        import datasets
        from datasets.distributed import split_dataset_by_node

        name, config = parse_hf_spec(self.spec)
        try:
            ds = datasets.load_dataset(name, config, split=self.split, streaming=True)
        except Exception as e:  # datasets raises many types (hub, builder, split errors)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"data.path {self.spec!r}: cannot open the dataset (split {self.split!r}): {msg}") from None
        features = getattr(ds, "features", None)
        if features is not None:
            if self.text_field not in features:
                raise DataError(f"{self.spec} (split {self.split!r}): no field {self.text_field!r} "
                                f"(fields: {', '.join(features)}); set data.text_field")
            ds = ds.select_columns([self.text_field])
        return split_dataset_by_node(ds, rank=lane, world_size=self.n_lanes)

    def _lane_pieces(self, lane: int, cursor: dict, skips: SkipCounter | None = None, hi: int | None = None):
        """(text, ends_document, cursor, next cursor) of a lane's pieces from ``cursor`` on (local
        files: up to the lane's end, or unit ``hi``)."""
        if not self.hf:
            hi = self._lane_range(lane)[1] if hi is None else hi
            for text, end, c, n in iter_unit_pieces(self.sources, cursor["u"], hi, self.text_field, skips):
                yield text, end, c, n
            return
        ds = self._hf_lane(lane)
        if cursor["s"] is not None:
            ds.load_state_dict(cursor["s"])
        where, field = f"{self.spec} (split {self.split!r})", self.text_field
        prev = cursor["s"]
        for ex in ds:
            state = ds.state_dict()
            if field not in ex:
                raise DataError(f"{where}: a record has no field {field!r} (fields: {', '.join(ex)}); set data.text_field")
            text = ex[field]
            if text is None:
                if skips is not None:
                    skips.add(where)
            elif not isinstance(text, str):
                raise DataError(f"{where}: a record's field {field!r} is {type(text).__name__}, not text")
            elif text:
                yield text, True, prev, state
            prev = state

    @staticmethod
    def _batches(pieces, n: int = _TOKENIZE_BATCH):
        batch = []
        for p in pieces:
            batch.append(p)
            if len(batch) >= n:
                yield batch
                batch = []
        if batch:
            yield batch

    def _encode(self, batch) -> list[list[int]]:
        eos = self.tok.eos_token_id
        ids = self.tok([p[0] for p in batch], add_special_tokens=False)["input_ids"]
        return [list(t) + ([eos] if p[1] else []) for p, t in zip(batch, ids)]

    def _cursor(self, c) -> dict:
        return {"s": c, "t": 0} if self.hf else {"u": c, "t": 0}

    def _lane_chunks(self, lane: int, cursor: dict, skips: SkipCounter | None):
        """A lane's chunks from ``cursor`` to its end: (blocks, cursor of the next chunk), CHUNK_BLOCKS
        blocks each but the last, whose cursor is None (the lane's partial last block is dropped).
        The pieces are read once, in one pass; the cursors are only for a resume."""
        buf: list[int] = []
        owners: list[tuple[int, dict]] = []  # (index in buf where a piece's tokens begin, cursor of that token)
        blocks: list[list[int]] = []
        pos, first, last_next = 0, True, None

        def cursor_at(i: int) -> dict:
            if i == len(buf):
                return last_next
            j = max(k for k, (s, _) in enumerate(owners) if s <= i)
            s, c = owners[j]
            return {**c, "t": c["t"] + i - s}

        for batch in self._batches(self._lane_pieces(lane, cursor, skips)):
            for (_, _, c, n), toks in zip(batch, self._encode(batch)):
                cur = self._cursor(c)
                if first:
                    toks, cur, first = toks[cursor["t"]:], dict(cursor), False
                owners.append((len(buf), cur))
                buf.extend(toks)
                last_next = self._cursor(n)
            while len(buf) - pos >= self.block:
                blocks.append(buf[pos : pos + self.block])
                pos += self.block
                if len(blocks) == CHUNK_BLOCKS:
                    yield blocks, cursor_at(pos)
                    blocks = []
            keep = max(k for k, (s, _) in enumerate(owners) if s <= pos)
            base = owners[keep][0]
            owners = [(s - base, c) for s, c in owners[keep:]]
            del buf[:base]
            pos -= base
        yield blocks, None

    def _lane_blocks(self, lane: int, state: dict | None) -> Iterator[tuple[list[int], dict]]:
        """A lane's blocks from ``state`` on, forever, each with the lane's state after it."""
        if state is None:
            state = {"epoch": 0, "chunk": 0, "cursor": self._lane_cursor(lane), "taken": 0}
        epoch, chunk, cursor, taken = state["epoch"], state["chunk"], state["cursor"], state["taken"]
        while True:
            yielded = chunk > 0 or taken > 0
            # null records are counted on the first pass only (self.skips: the counts of one epoch)
            for blocks, nxt in self._lane_chunks(lane, cursor, self.skips if epoch == 0 else None):
                random.Random(f"{self.seed}/{lane}/{epoch}/{chunk}").shuffle(blocks)
                if taken > len(blocks):
                    raise DataError(f"saved data position: lane {lane} chunk {chunk} has {len(blocks)} blocks, not "
                                    f"{taken}; did the data change?")
                if nxt is None:
                    after = {"epoch": epoch + 1, "chunk": 0, "cursor": self._lane_cursor(lane), "taken": 0}
                else:
                    after = {"epoch": epoch, "chunk": chunk + 1, "cursor": nxt, "taken": 0}
                for i in range(taken, len(blocks)):
                    yielded = True
                    yield blocks[i], after if i + 1 == len(blocks) else {
                        "epoch": epoch, "chunk": chunk, "cursor": cursor, "taken": i + 1}
                chunk, cursor, taken = after["chunk"], after["cursor"], 0
            if not yielded:
                lo, hi = self._lane_range(lane) if not self.hf else ("start", "end")
                raise DataError(
                    f"data.path {self.spec!r}: lane {lane} of {self.n_lanes} (units {lo} to {hi}) holds too little text "
                    f"for one training block of {self.block} tokens; lower data.lanes or add data"
                )
            epoch += 1

    def _rank_blocks(self, taken: int, lanes: dict) -> Iterator[tuple[list[int], int, dict]]:
        w, r, g, n_l = self.world_size, self.rank, self.group, self.n_lanes
        its = {lane: self._lane_blocks(lane, lanes.get(str(lane))) for lane in self.mine}
        state = {str(lane): lanes.get(str(lane)) for lane in self.mine}
        n = taken // w
        while True:
            mine = None
            for k in range(n * w, (n + 1) * w):
                if k % g != r % g:
                    continue
                lane = k % n_l
                b, st = next(its[lane])
                state[str(lane)] = st
                if k == n * w + r:
                    mine = b
            n += 1
            yield mine, n * w, dict(state)

    def train_blocks(self, pos: DataPosition) -> Iterator[list[int]]:
        """Training blocks from ``pos`` on, forever; updates ``pos`` in place as each block is
        handed out (``pos.taken``: blocks of all ranks, the same on every rank; ``pos.lanes``: the
        states of this rank's lanes)."""
        if pos.lanes is None:
            if pos.taken or pos.epoch:
                raise DataError(
                    f"saved data position {pos.to_dict()} is in the format of an older bitnet-train (blocks replayed "
                    "from the start of the stream); this version seeks lanes and cannot continue it: start a new run "
                    "or finish this one with the version that wrote it"
                )
            pos.lanes = {}
        if pos.taken % self.world_size:
            raise DataError(f"saved data position {pos.taken} is not a whole number of rounds of {self.world_size} "
                            "ranks; was it written at another world size mid-round?")
        if pos.taken:
            missing = [lane for lane in self.mine if str(lane) not in pos.lanes]
            if missing:
                raise DataError(f"saved data position has no state for lane(s) {missing} of {self.n_lanes}; "
                                "did data.lanes change?")
        self.train_start  # noqa: B018 - here, not in the prefetch thread
        start_taken, start_lanes = pos.taken, dict(pos.lanes)
        for b, taken, lanes in prefetched(lambda: self._rank_blocks(start_taken, start_lanes), PREFETCH_BLOCKS):
            pos.taken = taken
            pos.lanes = {**pos.lanes, **lanes}
            yield b


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
