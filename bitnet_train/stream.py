"""The streaming reader: documents tokenized, joined with EOS and packed into blocks on the fly
(:class:`PackedData`), with a seeded shuffle buffer and a background prefetch thread.

Every ``period``-th block of the stream is held out for validation; the rest go through the
shuffle buffer. The order depends only on the data and the seed, so a position — (epoch, blocks
taken this epoch) — identifies where training stands; resuming replays the stream up to it.
"""

from __future__ import annotations

import random
import sys
from typing import Iterator

from .blockorder import DataPosition, check_rank, held_out_period
from .documents import SkipCounter, check_table_schemas, encode_pieces, iter_piece_batches, resolve_files
from .errors import DataError

SHUFFLE_BUFFER = 1024
PREFETCH_BLOCKS = 64  # blocks the streaming reader prepares ahead, in a background thread


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
