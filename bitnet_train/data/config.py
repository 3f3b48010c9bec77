"""Pretraining data: local files or hub datasets read as a stream, tokenized, packed — or a
corpus pre-tokenized by ``bitnet-train tokenize`` (see :mod:`bitnet_train.data.shards`).

``data.path`` is one of:

* a file, a directory (every ``*.txt``/``*.jsonl``/``*.json``/``*.parquet``/``*.arrow`` below it,
  sorted; hidden files and the metadata ``datasets``' ``save_to_disk`` writes are left out) or a
  glob (``corpus/*.parquet``);
* ``hf:<dataset>[:<config>]``: a dataset read through ``datasets.load_dataset(..., streaming=True)``
  (split ``data.split``); ``<dataset>`` is a hub name or a local dataset directory;
* ``builtin:pydoc``: CPython's ``pydoc_data.topics`` help texts — a few hundred KB of English
  shipped with Python, so the tiny recipe needs no download;
* a directory written by ``bitnet-train tokenize`` (it holds ``index.json``): token shards read
  with random access (:class:`bitnet_train.data.shards.ShardData`).

Nothing is loaded whole: a ``.txt`` file is one document read in line chunks; in a ``.jsonl``
file each line is an object whose ``data.text_field`` is one document; ``.parquet`` files are read
a record batch at a time (only the text column); ``.arrow`` files (Arrow IPC, file or stream
format — what ``datasets`` writes to its cache and ``save_to_disk``) are memory-mapped and read a
record batch at a time. Records whose text is null are skipped and counted; a missing text
field/column, invalid UTF-8, an empty file or a path that matches nothing is a :class:`DataError`
naming the file.

Documents are tokenized, joined with EOS and cut into blocks of ``seq_len + 1`` tokens, read in
``data.lanes`` contiguous lanes interleaved block by block (:mod:`bitnet_train.data.stream`): the block
order depends only on the data, the seed and ``data.lanes`` — not on the world size — and rank
``r`` trains on blocks ``r, r + world, ...`` of it, reading only the lanes those come from. The
checkpointed position says where each lane stands (file, byte or record offset, token offset);
resuming seeks there.

Validation is whole documents, read once and never trained on: ``data.val_path`` (anything
``data.path`` accepts; its first ``data.val_tokens`` tokens of whole documents, all of it when 0),
or else the documents at the start of ``data.path`` up to ``data.val_tokens`` tokens, which
training then skips. It is packed and scored as ``bitnet-train eval`` packs (:mod:`bitnet_train.data.windows`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar

from bitnet_train.data.documents import HF_PREFIX, iter_documents, parse_hf_spec
from bitnet_train.data.stream import PackedData
from bitnet_train.errors import DataError, RecipeError, UserError
from bitnet_train.data.shards import DEFAULT_SHARD_TOKENS, ShardData, is_token_dir, tokenizer_for_token_dir, write_token_dir

BPE_SAMPLE_CHARS = 8_000_000


@dataclass
class DataConfig:
    path: str = field(metadata={"help": "file, directory, glob, hf:<dataset>[:<config>], builtin:pydoc, or a tokenized directory"})
    tokenizer: str = field(
        default="bpe:4096",
        metadata={"help": "transformers tokenizer name/path, or bpe:<vocab_size> to train one on the data"},
    )
    seq_len: int = field(default=256, metadata={"min": 8, "help": "tokens per training sequence"})
    val_tokens: int = field(
        default=65536, metadata={"min": 0, "help": "validation: tokens of whole documents from the start of data.path "
                                 "(never trained on; 0 = no validation), or the most read from data.val_path (0 = all)"})
    val_path: str | None = field(
        default=None, metadata={"help": "validation documents from a separate source (anything data.path accepts but a "
                                "tokenized directory); data.path is then trained on whole"})
    lanes: int = field(
        default=8, metadata={"min": 1, "help": "streamed data: contiguous lanes of the corpus read side by side; a "
                             "multiple of the number of processes makes each read only its share"})
    text_field: str = field(default="text", metadata={"help": "the text field of .jsonl records / column of parquet, arrow and hf: data"})
    split: str = field(default="train", metadata={"help": "split of an hf: dataset"})

    REMOVED_KEYS: ClassVar[dict] = {
        "val_fraction": "removed: validation is now whole documents, never trained on: data.val_tokens (tokens from "
                        "the start of data.path, default 65536) or data.val_path (a separate source); for the old "
                        "share, set data.val_tokens to about val_fraction times the corpus's tokens",
    }

    def validate(self):
        if self.val_path is not None and is_token_dir(self.val_path):
            raise RecipeError(f"data.val_path {self.val_path!r}: a tokenized directory has no text to score bits per "
                              "byte on; give the text it was made from")
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


def make_tokenizer(cfg: DataConfig, model: str | None = None):
    """The tokenizer of a fresh run, from its ``data`` section (and ``model:``): ``bpe:<n>`` trains
    a byte-level BPE on (up to 8 MB of) the data; anything else is a transformers name or path.
    For a tokenized directory it is the tokenizer saved there (after checking it matches
    ``data.tokenizer``). A pretrained ``model: hf:...`` comes with its vocabulary: the default
    ``data.tokenizer`` then means the model's own (a BPE trained on our data would not match its
    embeddings), and any other ``bpe:`` is an error."""
    from dataclasses import fields

    from bitnet_train.data.tokenizer import load_tokenizer, train_bpe

    spec = cfg.tokenizer
    if model is not None and model.startswith("hf:") and spec.startswith("bpe:"):
        default = next(f.default for f in fields(DataConfig) if f.name == "tokenizer")
        if spec != default:
            raise RecipeError(
                f"data.tokenizer {spec!r} trains a new vocabulary, which does not match the embeddings of "
                f"model {model!r}; leave data.tokenizer out (the model's own tokenizer is used) or name "
                "a tokenizer with the model's vocabulary"
            )
        return load_tokenizer(model[3:], what=f"model {model!r}")
    if is_token_dir(cfg.path):
        return tokenizer_for_token_dir(cfg.path, spec)
    if spec.startswith("bpe:"):
        texts = iter_documents(cfg.path, cfg.text_field, max_chars=BPE_SAMPLE_CHARS, split=cfg.split)
        return train_bpe(texts, vocab_size=int(spec[4:]))
    return load_tokenizer(spec, what=f"data.tokenizer {spec!r}")


def open_training_data(cfg: DataConfig, tokenizer, seed: int, rank: int = 0, world_size: int = 1):
    """The training data a recipe's ``data`` section describes, as seen by one rank: an object
    with ``validation()`` (a :class:`~bitnet_train.data.stream.HeldOut`) and ``train_blocks(pos)``.
    The one entry point the loop uses.

    A directory written by ``bitnet-train tokenize`` is read with random access
    (:class:`~bitnet_train.data.shards.ShardData`, after checking ``tokenizer`` is the one it was
    tokenized with); anything else is streamed (:class:`PackedData`)."""
    if is_token_dir(cfg.path):
        return ShardData(cfg.path, tokenizer, cfg.seq_len, seed, rank=rank, world_size=world_size,
                         val_tokens=cfg.val_tokens, val_path=cfg.val_path, text_field=cfg.text_field, split=cfg.split)
    return PackedData(cfg.path, tokenizer, cfg.seq_len, seed, cfg.text_field, rank=rank, world_size=world_size,
                      split=cfg.split, val_tokens=cfg.val_tokens, val_path=cfg.val_path, lanes=cfg.lanes)


# ----------------------------------------------------------------------------- CLI


def register(sub) -> None:
    """``bitnet-train tokenize``: write a corpus as token shards (:mod:`bitnet_train.data.shards`)."""
    p = sub.add_parser(
        "tokenize",
        help="pre-tokenize a corpus into memory-mapped token shards",
        description="Tokenize DATA (anything data.path accepts: files, directories, globs, hf:<dataset>[:<config>], "
        "builtin:pydoc) into DIR: uint16/uint32 token shards plus index.json and the tokenizer. "
        "Train on it with data.path: DIR.",
    )
    p.add_argument("data", metavar="DATA", help="file, directory, glob, hf:<dataset>[:<config>] or builtin:pydoc")
    p.add_argument("--tokenizer", required=True, metavar="T",
                   help="transformers tokenizer name/path, or bpe:<vocab_size> to train a byte-level BPE on the data")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (written atomically)")
    p.add_argument("--text-field", default="text", help="text field/column of jsonl, parquet, arrow and hf: data (default: text)")
    p.add_argument("--split", default="train", help="split of an hf: dataset (default: train)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard file (default: {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32"),
                   help="token id type; auto = uint16 when the vocabulary fits")
    p.add_argument("--batch-docs", type=int, default=256, metavar="N",
                   help="documents tokenized per call (the Rust tokenizer encodes a batch on all cores)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="tokenizing processes (default 1, whose Rust tokenizer already encodes each batch on all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tokenize)


def cmd_tokenize(args) -> int:
    try:
        cfg = DataConfig(path=args.data, tokenizer=args.tokenizer, text_field=args.text_field, split=args.split)
        if args.tokenizer.startswith("bpe:"):
            n = args.tokenizer[4:]
            if not n.isdigit() or int(n) < 260:
                raise UserError(f"--tokenizer {args.tokenizer!r}: expected bpe:<vocab_size> with vocab_size >= 260")
        tok = make_tokenizer(cfg)
        idx = write_token_dir(
            args.data, tok, args.out, tokenizer_spec=args.tokenizer, text_field=args.text_field, split=args.split,
            shard_tokens=args.shard_tokens, dtype=args.dtype, batch=max(1, args.batch_docs), workers=max(1, args.workers),
            progress=not args.no_progress,
        )
    except DataError as e:
        raise UserError(str(e)) from None
    secs = idx["seconds"]
    skipped = f", {idx['skipped_null_records']} null record(s) skipped" if idx["skipped_null_records"] else ""
    print(
        f"tokenize: {idx['total_tokens']:,} tokens from {idx['documents']:,} documents in {len(idx['shards'])} "
        f"{idx['dtype']} shard(s){skipped}, {secs:.1f} s ({idx['total_tokens'] / max(secs, 1e-9):,.0f} tokens/s); "
        f"train on it with data.path: {args.out} and data.tokenizer: {args.tokenizer}",
        file=sys.stdout,
    )
    return 0
