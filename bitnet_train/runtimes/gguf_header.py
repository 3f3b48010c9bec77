"""A GGUF file's header: its metadata and tensor table, read without its tensor data.

The ``gguf`` package's reader stops at tensor types it does not know (ik_llama.cpp's IQ1_BN / IQ2_BN /
IQ2_BN_R4, bitnet.cpp's I2_S); :func:`read_header` skips that step, so every runtime's files read here.
"""

from __future__ import annotations

from pathlib import Path

from bitnet_train.errors import UserError


def read_header(path: str | Path, keys=None) -> tuple[dict, list[tuple[str, tuple[int, ...], int]]]:
    """(metadata {key: value}, [(tensor name, dims, ggml type id)]) of a GGUF, parsed by the gguf
    package's reader with its tensor-data step skipped. ``keys``: convert only these metadata keys, a
    collection or a predicate (the token and merge lists of a big vocabulary take seconds)."""
    import gguf

    check_magic(path)

    class _Header(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):  # noqa: ANN001 - gguf's signature
            self.tensor_infos = [
                (str(bytes(f.parts[1]), encoding="utf-8"), tuple(int(d) for d in f.parts[3]), int(f.parts[4][0]))
                for f in fields
            ]

    try:
        r = _Header(str(path))
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable GGUF file: {e}") from None
    meta = {}
    for key, f in r.fields.items():
        wanted = keys is None or (keys(key) if callable(keys) else key in keys)
        if key.startswith("GGUF.") or not f.types or not wanted:
            continue
        try:
            meta[key] = f.contents()
        except Exception:  # noqa: BLE001 - a field type this version cannot render
            continue
    return meta, r.tensor_infos


def check_magic(path: str | Path) -> None:
    """A clear error for a file that is not a GGUF (truncated, or another format)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); truncated or not an export?")


def summary(path: str | Path) -> dict:
    """The header facts runtimes choose by: ``arch``, ``file_type``, ``types`` (the set of tensor type
    ids), ``tensors`` (names) and the ``<arch>.*`` / ``general.*`` metadata (no token lists)."""
    meta, tensors = read_header(path, keys=lambda k: not k.startswith("tokenizer."))
    arch = meta.get("general.architecture")
    ft = meta.get("general.file_type")
    return {"arch": arch, "file_type": int(ft) if ft is not None else None, "types": {t for _n, _d, t in tensors},
            "tensors": [n for n, _d, _t in tensors], "meta": meta}


CHAT_KEYS = ("tokenizer.chat_template", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")


def chat_template(meta, token_text) -> tuple[str | None, dict]:
    """(the GGUF's ``tokenizer.chat_template`` or None, its ``bos_token`` / ``eos_token`` texts for rendering
    it) from ``meta(key)`` (the metadata of the runtime that loaded the file, or of :func:`read_header`);
    ``token_text(id)`` gives a token's text there."""
    meta = {k: meta(k) for k in CHAT_KEYS}
    special = {}
    for name in ("bos", "eos"):
        i = meta.get(f"tokenizer.ggml.{name}_token_id")
        if i is not None:
            special[f"{name}_token"] = token_text(int(i))
    return meta.get("tokenizer.chat_template"), special
