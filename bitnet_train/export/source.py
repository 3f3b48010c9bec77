"""Reading a checkpoint for export: one tensor at a time, straight from its safetensors shards.

Nothing here loads the model. The set of ternary tensors is decided exactly as the loader
decides it (the checkpoint's ``quantization_config`` applied to the architecture built on the
meta device), and every ternary tensor's codes and scale come from :func:`bitnet_train.quant.weight_quant`
— the one reference the trainer's forward uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bitnet_train.checkpoint.format import read_config_json
from bitnet_train.errors import ExportError


class CheckpointSource:
    """A checkpoint directory read lazily: ``config``, ``keys()``, ``shape(k)``, ``tensor(k)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ExportError(f"{self.path}: not a checkpoint directory")
        self.config = read_config_json(self.path)
        qc = self.config.get("quantization_config")
        if qc is None:
            raise ExportError(
                f"{self.path}/config.json: the checkpoint is not ternary (no quantization_config; "
                "it was trained with quant: none); only BitNet checkpoints can be exported to packed formats"
            )
        if qc.get("quant_method") != "bitnet" or qc.get("quantization_mode", "offline") != "online":
            raise ExportError(
                f"{self.path}/config.json: quantization_config is {qc.get('quant_method')!r}/"
                f"{qc.get('quantization_mode', 'offline')!r}; export reads bitnet-train checkpoints "
                "(quant_method bitnet, quantization_mode online: latent weights)"
            )
        self.qc = qc
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._open: dict[Path, object] = {}
        self._index()
        self.ternary_modules = self._ternary_modules()

    # -- tensors ------------------------------------------------------------------------------
    def _index(self) -> None:
        from safetensors import safe_open

        idx = self.path / "model.safetensors.index.json"
        if idx.is_file():
            files = sorted({self.path / f for f in json.loads(idx.read_text())["weight_map"].values()})
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ExportError(f"{self.path}: no .safetensors weight files")
        for f in files:
            if not f.is_file():
                raise ExportError(f"{f}: listed in model.safetensors.index.json but missing")
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        self._where[k] = f
                        self._shapes[k] = tuple(sf.get_slice(k).get_shape())
            except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError / OSError
                raise ExportError(f"{f}: not a readable safetensors file (truncated or corrupt?): {e}") from None

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, read from its shard (nothing else is loaded)."""
        from safetensors import safe_open

        f = self._where[key]
        try:
            with safe_open(str(f), framework="pt") as sf:
                return sf.get_tensor(key)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"{f}: cannot read tensor {key!r} (truncated or corrupt?): {e}") from None

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self._where.values()))

    # -- ternary layers -------------------------------------------------------------------------
    def _ternary_modules(self) -> set[str]:
        """Names of the layers the loader turns into BitLinear: the checkpoint loaded the one way
        (:func:`bitnet_train.checkpoint.format.load_checkpoint`), on the meta device (no weights read)."""
        from bitnet_train.layers.bitlinear import bitlinear_modules
        from bitnet_train.checkpoint.format import load_checkpoint

        model = load_checkpoint(self.path, device="meta", require_causal_lm=False)
        return {name for name, _ in bitlinear_modules(model)}

    def is_ternary(self, key: str) -> bool:
        return key.endswith(".weight") and key[: -len(".weight")] in self.ternary_modules

    def ternary(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (int8) and scale (fp32 0-dim) of a ternary weight, from :func:`quant.weight_quant`."""
        from bitnet_train.quant import weight_quant

        return weight_quant(self.tensor(key).float())

    # -- facts about the model ------------------------------------------------------------------
    @property
    def hidden_act(self) -> str:
        return self.config.get("hidden_act", "relu2")

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def head_is_embedding(self) -> bool:
        """True when the output matrix is the token embedding (tied, or an identical copy)."""
        if "lm_head.weight" not in self._where:
            return self.tied
        if "model.embed_tokens.weight" not in self._where:
            return False
        return self.tied or torch.equal(self.tensor("lm_head.weight"), self.tensor("model.embed_tokens.weight"))


def load_tokenizer_for(src: CheckpointSource, tokenizer: str | None = None):
    """The tokenizer saved with the checkpoint (or ``tokenizer``, a directory or hub name)."""
    from bitnet_train.data.tokenizer import load_tokenizer

    where = tokenizer or str(src.path)
    if tokenizer is None and not any((src.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ExportError(
            f"{src.path}: the checkpoint holds no tokenizer; pass --tokenizer DIR_OR_NAME "
            "(the exported model carries its tokenizer)"
        )
    return load_tokenizer(where, error=ExportError, special_tokens=False)
