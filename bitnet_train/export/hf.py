"""``--format hf``: transformers' packed BitNet layout, which stock ``from_pretrained`` loads.

Every ternary linear becomes transformers' ``BitLinear`` (``linear_class: bitlinear``,
``quantization_mode: offline``):

* ``weight``: uint8 ``[out/4, in]``, code + 1 in 2-bit fields, packed along the output dimension
  in four blocks (:func:`bitnet_train.quant.pack_hf`, equal to transformers' ``pack_weights``);
* ``weight_scale``: shape ``(1,)``, **1 / mean|W|** — the ``bitlinear`` convention, whose forward
  divides by it (``linear_class: autobitlinear`` would multiply instead and hold mean|W|).

Everything else (embedding, norms, an untied head) is copied unchanged. Tensors are converted one
at a time and written in safetensors shards of at most ``max_shard_bytes``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bitnet_train.errors import ExportError
from bitnet_train.export.source import CheckpointSource

LINEAR_CLASS = "bitlinear"


def quantization_config(src: CheckpointSource) -> dict:
    """The packed directory's ``quantization_config`` (built in :mod:`bitnet_train.checkpoint.format`)."""
    from bitnet_train.checkpoint.format import packed_quantization_config

    return packed_quantization_config(src.qc)


def write_hf(src: CheckpointSource, out: Path, tokenizer, max_shard_bytes: int = 2 * 2**30, progress=None) -> dict:
    """Write the packed model into the (temporary) directory ``out``; ``progress(done, total, name)``
    is called after each tensor."""
    from safetensors.torch import save_file

    from bitnet_train.quant import pack_hf

    out = Path(out)
    dtype = getattr(torch, src.config.get("dtype") or src.config.get("torch_dtype") or "float32")
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    packed = 0

    def flush():
        if not shards[-1]:
            return
        f = out / f".shard-{len(written):05d}.safetensors"
        save_file(shards[-1], str(f), metadata={"format": "pt"})
        for k in shards[-1]:
            weight_map[k] = f.name
        written.append(f)
        shards[-1] = {}
        sizes[-1] = 0

    def add(name, t):
        n = t.numel() * t.element_size()
        if sizes[-1] and sizes[-1] + n > max_shard_bytes:
            flush()
        shards[-1][name] = t.contiguous()
        sizes[-1] += n

    keys = list(src.keys())
    for i, key in enumerate(keys):
        if progress:
            progress(i, len(keys), key)
        if src.is_ternary(key):
            out_features = src.shape(key)[0]
            if out_features % 4:
                raise ExportError(
                    f"tensor {key!r} has {out_features} output rows; transformers' packed BitLinear needs a "
                    "multiple of 4 (it packs four rows per byte)"
                )
            codes, s = src.ternary(key)
            add(key, pack_hf(codes))
            # bitlinear convention: forward divides by weight_scale, so it holds 1 / mean|W|
            add(key[: -len("weight")] + "weight_scale", (1.0 / s).reshape(1).to(dtype))
            packed += 1
            del codes
        else:
            add(key, src.tensor(key))
    flush()
    if progress:
        progress(len(keys), len(keys), "")

    # final names as save_pretrained writes them
    n = len(written)
    names = {}
    for i, f in enumerate(written):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        f.rename(out / final)
        names[f.name] = final
    if n > 1:
        index = {"metadata": {"total_size": sum((out / v).stat().st_size for v in names.values())},
                 "weight_map": {k: names[v] for k, v in sorted(weight_map.items())}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    config = dict(src.config)
    config["quantization_config"] = quantization_config(src)
    meta = dict(config.get("bitnet_train") or {})
    meta["exported_from"] = str(src.path)
    meta["format"] = "hf-packed"
    config["bitnet_train"] = meta
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    gen = src.path / "generation_config.json"
    if gen.is_file():
        (out / "generation_config.json").write_text(gen.read_text())
    tokenizer.save_pretrained(str(out))
    return {"packed_layers": packed, "shards": n, "linear_class": LINEAR_CLASS}
