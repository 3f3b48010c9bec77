"""Pre-tokenized corpora: ``bitnet-train tokenize`` writes them, :class:`ShardData` reads them.

A tokenized directory::

    DIR/index.json          format, dtype, vocab size, EOS id, tokenizer (recipe spec and
                            fingerprint), source, and the shards with their token counts
    DIR/shard-00000.bin     raw little-endian uint16 (vocab <= 65536) or uint32 token ids
    DIR/shard-00001.bin     ...
    DIR/tokenizer/          the tokenizer it was made with (``save_pretrained``)

The shards hold one token stream — every document's tokens followed by EOS, in the source's
order, exactly what the streaming reader produces — split into files of at most
``--shard-tokens`` tokens (a document may straddle two shards). Nothing in it depends on
``seq_len``: the trainer memory-maps the shards and cuts blocks of ``seq_len + 1`` tokens at
multiples of ``seq_len + 1``, so the same directory serves any sequence length.

Reading (:class:`ShardData`): validation is ``data.val_path``'s documents, or the whole documents
at the start of the stream up to the first EOS at or after ``data.val_tokens`` tokens (the same
documents the streaming reader holds out when no document is a ``.txt`` file); training block ``i``
is the ``seq_len + 1`` tokens at ``train_start + i * (seq_len + 1)``, after them. Each epoch visits
the training blocks in a permutation seeded by (seed, epoch): a
:class:`~bitnet_train.data.block_order.BlockPermutation`, a keyed Feistel network computed per index (O(1)
memory at any corpus size, where a materialized permutation of 4 T tokens' blocks takes gigabytes
per rank). A training block is handed out as a 1-D ``numpy`` view of the memory map (no Python
list); the loop copies a micro-batch of them into one tensor. In each round of ``world_size``
consecutive entries of the permutation, rank ``r`` takes entry ``r``: ranks never share a block,
and the data position (epoch, entries taken) is the same on every rank. Resuming jumps straight to
the position: no replay.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

from bitnet_train.data.block_order import BlockPermutation, DataPosition, check_rank
from bitnet_train.data.documents import SkipCounter, encode_pieces, iter_piece_batches
from bitnet_train.errors import DataError

INDEX = "index.json"
FORMAT = "bitnet-train-tokens"
VERSION = 1
TOKENIZER_DIR = "tokenizer"
DEFAULT_SHARD_TOKENS = 100_000_000
_DTYPES = {"uint16": 2, "uint32": 4}


def is_token_dir(path) -> bool:
    """Whether ``path`` is a directory written by ``bitnet-train tokenize`` (holds ``index.json``)."""
    if not isinstance(path, (str, Path)) or (isinstance(path, str) and ":" in path.split("/")[0]):
        return False  # hf:..., builtin:...
    p = Path(path).expanduser()
    return p.is_dir() and (p / INDEX).is_file()


def tokenizer_fingerprint(tok) -> str:
    """A short hash of what maps text to ids (vocabulary, merges, added tokens, normalizer,
    pre-tokenizer); equal for a tokenizer and its ``save_pretrained`` round trip."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        d = json.loads(backend.to_str())
        keep = {k: d.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer")}
    else:
        keep = {"vocab": sorted(tok.get_vocab().items())}
    blob = json.dumps(keep, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def pick_dtype(dtype: str, vocab_size: int) -> str:
    if dtype == "auto":
        return "uint16" if vocab_size <= 1 << 16 else "uint32"
    if dtype not in _DTYPES:
        raise DataError(f"--dtype {dtype!r}: choose auto, uint16 or uint32")
    if dtype == "uint16" and vocab_size > 1 << 16:
        raise DataError(f"--dtype uint16 cannot hold the ids of a {vocab_size}-token vocabulary; use uint32 or auto")
    return dtype


# ----------------------------------------------------------------------------- writing


_WORKER: dict = {}


def _encode_array(tokenizer, pieces, vocab: int, dtype: str):
    import numpy as np

    toks, docs = encode_pieces(tokenizer, pieces)
    arr = np.asarray(toks, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab):
        raise DataError(f"the tokenizer produced id {int(arr.max())} outside its vocabulary of {vocab}")
    return arr.astype(np.dtype(dtype).newbyteorder("<")), docs


def _worker_init(tok_dir: str, vocab: int, dtype: str, eos: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core instead
    from transformers import AutoTokenizer

    _WORKER.update(vocab=vocab, dtype=dtype, error=None)
    try:  # an initializer that raises makes the pool respawn workers forever: report it per task
        tok = AutoTokenizer.from_pretrained(tok_dir)
        if tok.eos_token_id != eos or len(tok) != vocab:
            raise ValueError("it differs from the one given")
        _WORKER["tok"] = tok
    except Exception as e:
        _WORKER["error"] = f"tokenize worker: cannot reload the tokenizer from {tok_dir}: {e}"


def _worker_encode(pieces):
    if _WORKER.get("error"):
        return _WORKER["error"]
    try:
        return _encode_array(_WORKER["tok"], pieces, _WORKER["vocab"], _WORKER["dtype"])
    except DataError as e:
        return str(e)  # re-raised as a DataError in the parent


def _bounded_imap(pool, fn, items, window: int):
    """``pool.imap`` in order, with at most ``window`` tasks in flight (``imap`` itself would
    read the whole source ahead into memory)."""
    from collections import deque

    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def write_token_dir(source: str, tokenizer, out, *, tokenizer_spec: str, text_field: str = "text", split: str = "train",
                    shard_tokens: int = DEFAULT_SHARD_TOKENS, dtype: str = "auto", batch: int = 256,
                    workers: int = 1, progress: bool = False) -> dict:
    """Tokenize ``source`` (any ``data.path`` the streaming reader accepts) into the directory
    ``out``, atomically. Returns the index. ``workers > 1`` tokenizes batches in that many
    processes (the parent reads the source and writes the shards, in order: the output is
    identical to ``workers=1``). A second writer of the same ``out`` is refused while one runs;
    what a killed one left there is removed first."""
    from bitnet_train.fsutil import clean_leftovers, owned

    with owned(out, "tokenize", inside=False):
        clean_leftovers(out)
        return _write_token_dir(source, tokenizer, out, tokenizer_spec=tokenizer_spec, text_field=text_field,
                                split=split, shard_tokens=shard_tokens, dtype=dtype, batch=batch, workers=workers,
                                progress=progress)


def _write_token_dir(source: str, tokenizer, out, *, tokenizer_spec: str, text_field: str, split: str,
                     shard_tokens: int, dtype: str, batch: int, workers: int, progress: bool) -> dict:
    from bitnet_train.fsutil import atomic_dir

    if shard_tokens < 1:
        raise DataError(f"--shard-tokens {shard_tokens}: must be at least 1")
    if is_token_dir(source):
        raise DataError(f"{source} is already tokenized")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to join documents with")
    vocab = len(tokenizer)
    dt = pick_dtype(dtype, vocab)
    skips = SkipCounter()
    shards: list[dict] = []
    total = docs = 0
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(unit="tok", unit_scale=True, desc="tokenize", dynamic_ncols=True)
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        batches = iter_piece_batches(source, text_field, split, batch, skips)
        pool = None
        if workers > 1:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(workers, initializer=_worker_init,
                            initargs=(str(tmp / TOKENIZER_DIR), vocab, dt, tokenizer.eos_token_id))
            arrays = _bounded_imap(pool, _worker_encode, batches, window=2 * workers)
        else:
            arrays = (_encode_array(tokenizer, b, vocab, dt) for b in batches)
        f = None
        room = 0
        try:
            for res in arrays:
                if isinstance(res, str):
                    raise DataError(res)
                arr, nd = res
                docs += nd
                while arr.size:
                    if room == 0:
                        if f is not None:
                            f.close()
                        name = f"shard-{len(shards):05d}.bin"
                        f = open(tmp / name, "wb")
                        shards.append({"file": name, "tokens": 0})
                        room = shard_tokens
                    part, arr = arr[:room], arr[room:]
                    f.write(part.tobytes())
                    shards[-1]["tokens"] += int(part.size)
                    room -= int(part.size)
                    total += int(part.size)
                    if bar is not None:
                        bar.update(int(part.size))
        finally:
            if f is not None:
                f.close()
            if bar is not None:
                bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
        if total == 0:
            raise DataError(f"{source}: no tokens (the data holds no text)")
        index = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dt,
            "vocab_size": vocab,
            "eos_token_id": tokenizer.eos_token_id,
            "tokenizer": {"spec": tokenizer_spec, "fingerprint": tokenizer_fingerprint(tokenizer)},
            "source": source,
            "text_field": text_field,
            "split": split,
            "documents": docs,
            "total_tokens": total,
            "shards": shards,
            "skipped_null_records": skips.total,
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    index["seconds"] = time.perf_counter() - t0
    return index


# ----------------------------------------------------------------------------- reading


def read_index(path) -> dict:
    """The validated index of a tokenized directory; DataError names what is wrong."""
    d = Path(path).expanduser()
    ip = d / INDEX
    try:
        idx = json.loads(ip.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{d}: no {INDEX}; not a directory written by bitnet-train tokenize") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{ip}: corrupt index (not valid JSON: {e}); re-run bitnet-train tokenize") from None
    bad = lambda what: DataError(f"{ip}: corrupt index ({what}); re-run bitnet-train tokenize")  # noqa: E731
    if not isinstance(idx, dict) or idx.get("format") != FORMAT:
        raise bad(f"'format' is not {FORMAT!r}")
    if idx.get("version") != VERSION:
        raise DataError(f"{ip}: format version {idx.get('version')!r}; this bitnet-train reads version {VERSION}")
    if idx.get("dtype") not in _DTYPES:
        raise bad(f"dtype {idx.get('dtype')!r}")
    vocab = idx.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1 or (idx["dtype"] == "uint16" and vocab > 1 << 16):
        raise bad(f"vocab_size {vocab!r}")
    tk = idx.get("tokenizer")
    if not isinstance(tk, dict) or not isinstance(tk.get("fingerprint"), str):
        raise bad("no tokenizer fingerprint")
    shards = idx.get("shards")
    if not isinstance(shards, list) or not shards:
        raise bad("no shards")
    item = _DTYPES[idx["dtype"]]
    total = 0
    for s in shards:
        if not isinstance(s, dict) or not isinstance(s.get("file"), str) or not isinstance(s.get("tokens"), int):
            raise bad(f"shard entry {s!r}")
        name, n = s["file"], s["tokens"]
        if Path(name).name != name or n < 0:
            raise bad(f"shard entry {s!r}")
        f = d / name
        if not f.is_file():
            raise DataError(f"{f}: shard listed in {INDEX} is missing")
        size = f.stat().st_size
        if size != n * item:
            raise DataError(
                f"{f}: holds {size} bytes but {INDEX} says {n} {idx['dtype']} tokens ({n * item} bytes); "
                "the directory is truncated or was changed: re-run bitnet-train tokenize"
            )
        total += n
    if idx.get("total_tokens") != total:
        raise bad(f"total_tokens {idx.get('total_tokens')!r} is not the sum of the shards ({total})")
    return idx


def tokenizer_for_token_dir(path, spec: str):
    """The tokenizer to train on a tokenized directory with, given the recipe's ``data.tokenizer``:
    the one saved in the directory when ``spec`` is the spec it was tokenized with (or that
    directory), else ``spec`` loaded (its fingerprint is checked by :class:`ShardData`)."""
    from bitnet_train.data.tokenizer import load_tokenizer

    idx = read_index(path)
    saved = Path(path).expanduser() / TOKENIZER_DIR
    rec = idx["tokenizer"].get("spec")
    if spec == rec or (Path(spec).expanduser().is_dir() and Path(spec).expanduser().resolve() == saved.resolve()):
        if not saved.is_dir():
            raise DataError(f"{saved}: the tokenizer saved with the tokenized data is missing")
        return load_tokenizer(saved, error=DataError)
    if spec.startswith("bpe:"):
        raise DataError(
            f"data.path {str(path)!r} was tokenized with {rec!r}, but data.tokenizer is {spec!r} (a new BPE cannot be "
            f"trained on token ids): set data.tokenizer to {rec!r} (the tokenizer saved in {saved})"
        )
    return load_tokenizer(spec, what=f"data.tokenizer {spec!r}")


class ShardData:
    """Train/validation blocks of a tokenized directory, with random access (memory-mapped)."""

    def __init__(self, path, tokenizer, seq_len: int, seed: int, rank: int = 0, world_size: int = 1,
                 val_tokens: int = 0, val_path: str | None = None, text_field: str = "text", split: str = "train"):
        import numpy as np

        self.path = Path(path).expanduser()
        self.index = idx = read_index(self.path)
        check_rank(rank, world_size)
        self.rank, self.world_size = rank, world_size
        fp = tokenizer_fingerprint(tokenizer)
        if fp != idx["tokenizer"]["fingerprint"] or len(tokenizer) != idx["vocab_size"]:
            raise DataError(
                f"data.path {str(path)!r} was tokenized with {idx['tokenizer'].get('spec')!r} (vocab {idx['vocab_size']}, "
                f"fingerprint {idx['tokenizer']['fingerprint']}), but the recipe's tokenizer differs (vocab {len(tokenizer)}, "
                f"fingerprint {fp}): set data.tokenizer to {idx['tokenizer'].get('spec')!r} or re-run bitnet-train tokenize"
            )
        dt = np.dtype(idx["dtype"]).newbyteorder("<")
        self._arrays = [
            np.memmap(self.path / s["file"], dtype=dt, mode="r", shape=(s["tokens"],))
            for s in idx["shards"] if s["tokens"] > 0
        ]
        self._starts = np.cumsum([0] + [a.shape[0] for a in self._arrays])
        self.total_tokens = int(self._starts[-1])
        self.block, self.seq_len, self.tok = seq_len + 1, seq_len, tokenizer
        self.seed = seed
        self.val_tokens, self.val_path, self.text_field, self.split = val_tokens, val_path, text_field, split
        self.train_start = 0 if val_path else self._held_out_end(val_tokens)
        self._held_out = None
        self.n_blocks = self.n_train = (self.total_tokens - self.train_start) // self.block
        if self.n_train < world_size:
            raise DataError(
                f"data.path {str(path)!r}: {self.total_tokens} tokens make {self.n_train} training blocks of "
                f"{self.block} tokens, fewer than the {world_size} rank(s)"
            )
        self._perm_epoch, self._perm = None, None

    # token access
    def tokens(self, start: int, length: int):
        """Tokens ``[start, start + length)`` of the stream (a numpy array; may span shards)."""
        import numpy as np

        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts = []
        while length > 0:
            a = self._arrays[i]
            off = start - int(self._starts[i])
            part = a[off : off + length]
            parts.append(part)
            length -= part.shape[0]
            start += part.shape[0]
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


    def _held_out_end(self, val_tokens: int) -> int:
        """The end of the held-out documents: just after the first EOS at or after ``val_tokens``
        tokens (0: none held out)."""
        import numpy as np

        if val_tokens <= 0:
            return 0
        eos, at, step = self.index["eos_token_id"], val_tokens - 1, 1 << 20
        while at < self.total_tokens:
            hits = np.flatnonzero(self.tokens(at, min(step, self.total_tokens - at)) == eos)
            if hits.size:
                return at + int(hits[0]) + 1
            at += step
        raise DataError(f"data.path {str(self.path)!r}: no document ends after data.val_tokens {val_tokens} tokens: "
                        "holding out whole documents would leave nothing to train on; lower data.val_tokens")

    def validation(self):
        """The held-out documents as packed windows (:class:`bitnet_train.data.stream.HeldOut`); the same
        on every rank."""
        from bitnet_train.data.stream import HeldOut, held_out_documents, pack_held_out

        if self._held_out is None:
            if self.val_path:
                self._held_out = held_out_documents(self.val_path, self.tok, self.seq_len, self.val_tokens,
                                                    self.text_field, self.split)
            elif self.train_start:
                toks = self.tokens(0, self.train_start).tolist()
                eos = self.index["eos_token_id"]
                self._held_out = pack_held_out([toks], eos, self.seq_len, None, toks.count(eos))
            else:
                self._held_out = HeldOut([], None, 0, 0)
        return self._held_out

    def permutation(self, epoch: int) -> "BlockPermutation":
        """The order in which epoch ``epoch`` visits the training blocks: entry ``k`` is the
        training block taken ``k``-th (computed on demand, O(1) memory)."""
        if self._perm_epoch != epoch:
            self._perm = BlockPermutation(self.n_train, self.seed, epoch)
            self._perm_epoch = epoch
        return self._perm

    def block_array(self, i: int):
        """Training block ``i`` as a 1-D array (a view of the memory map when it lies in one shard);
        the held-out documents come before block 0."""
        return self.tokens(self.train_start + i * self.block, self.block)

    def train_blocks(self, pos: DataPosition) -> Iterator:
        """Training blocks (1-D ``numpy`` arrays of ``seq_len + 1`` token ids, read from the memory
        map) from ``pos`` on, forever; updates ``pos`` in place. Round ``k`` (from
        the position the iterator started at) gives rank ``r`` permutation entry
        ``pos.taken + k * world_size + r``; ``pos.taken`` moves a whole round at a time."""
        w, r = self.world_size, self.rank
        if pos.taken > self.n_train:
            raise DataError(
                f"saved data position {pos.taken} is past the end of epoch {pos.epoch} ({self.n_train} blocks); "
                "did the data change?"
            )
        while True:
            perm = self.permutation(pos.epoch)
            k = pos.taken
            while k + w <= self.n_train:
                j = perm[k + r]
                pos.taken = k + w
                yield self.block_array(j)
                k += w
            pos.epoch += 1
            pos.taken = 0

