"""The checkpoint format: a transformers ``save_pretrained`` directory that stock transformers loads.

A checkpoint holds safetensors *latent* weights, ``config.json``, ``generation_config.json`` and
the tokenizer when there is one. For a ternary model ``config.json`` carries::

    quantization_config: {quant_method: bitnet, linear_class: autobitlinear,
                          quantization_mode: online, modules_to_not_convert: [...]}

so that ``AutoModelForCausalLM.from_pretrained(dir)`` — without bitnet_train — swaps the same
Linear layers for transformers' ``AutoBitLinear`` and computes the logits we compute. Our own
loader reads the same directory and puts :class:`BitLinear` in those places instead.

Checkpoints are written atomically (see :mod:`bitnet_train.fsutil`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from bitnet_train.layers.bitlinear import BitLinear, bitlinear_modules, convert_to_bitlinear
from bitnet_train.errors import CheckpointError
from bitnet_train.fsutil import atomic_dir

QUANT_METHOD = "bitnet"


def quantization_config(modules_to_not_convert: list[str], use_rms_norm: bool = False, rms_norm_eps: float = 1e-6,
                        packed: bool = False) -> dict:
    """The ``quantization_config`` of a ternary checkpoint (the one place it is built): latent
    weights quantized on the fly by transformers' ``AutoBitLinear`` (``online``), or, ``packed``,
    2-bit weights for its ``BitLinear`` (``offline``, what the packed HF export writes)."""
    return {
        "quant_method": QUANT_METHOD,
        "linear_class": "bitlinear" if packed else "autobitlinear",
        "quantization_mode": "offline" if packed else "online",
        "modules_to_not_convert": list(modules_to_not_convert),
        "use_rms_norm": bool(use_rms_norm),
        "rms_norm_eps": float(rms_norm_eps),
    }


def packed_quantization_config(qc: dict) -> dict:
    """The packed (``offline``) ``quantization_config`` for a checkpoint whose online one is ``qc``."""
    return quantization_config(qc.get("modules_to_not_convert") or ["lm_head"], bool(qc.get("use_rms_norm", False)),
                               float(qc.get("rms_norm_eps") or 1e-6), packed=True)


def quantization_config_for(model: torch.nn.Module) -> dict | None:
    """The ``quantization_config`` that makes stock transformers quantize exactly our layers."""
    bit = bitlinear_modules(model)
    if not bit:
        return None
    not_converted = sorted(n for n, m in model.named_modules() if type(m) is torch.nn.Linear)
    rms = [m for _, m in bit if m.rms_norm is not None]
    if rms and len(rms) != len(bit):
        raise CheckpointError("some BitLinear layers have an input RMSNorm and some do not; stock transformers cannot express that")
    return quantization_config(not_converted, bool(rms), float(rms[0].rms_norm.variance_epsilon) if rms else 1e-6)


def checkpoint_metadata(model) -> tuple[dict | None, dict]:
    """What a checkpoint of ``model`` carries in ``config.json`` besides the model's own config:
    its ``quantization_config`` (None for a full-precision model) and its ``bitnet_train`` block
    (the model's, with ``quant`` and the BitLinear ``backend``). The one place they are made, for
    :func:`save_checkpoint` and for the Trainer checkpoints of ``sft``/``dpo``."""
    qc = quantization_config_for(model)
    meta = dict(getattr(model.config, "bitnet_train", None) or {})
    meta["quant"] = "bitnet" if qc else "none"
    if qc:
        meta["backend"] = bit_backend(model)
    return qc, meta


def save_checkpoint(
    model: PreTrainedModel,
    path: str | os.PathLike,
    tokenizer=None,
    extra: dict | None = None,
    write_extra=None,
    state_dict: dict | None = None,
    weights: bool = True,
) -> Path:
    """Write ``model`` (and ``tokenizer``) as a checkpoint directory at ``path``, atomically.

    ``extra`` is a JSON-able dict saved as ``bitnet_train.json``; ``write_extra(tmpdir)`` may add
    more files (optimizer state, ...) into the directory before it is moved into place.
    ``state_dict`` (e.g. the full state gathered from FSDP shards) is written instead of ``model``'s.
    ``weights=False`` writes the config only (a sharded checkpoint's weights are ``write_extra``'s).
    """
    path = Path(path)
    qc, meta = checkpoint_metadata(model)
    cfg = model.config
    had_qc = getattr(cfg, "quantization_config", None)
    with atomic_dir(path) as tmp:
        try:
            if qc:
                cfg.quantization_config = qc
            elif had_qc is not None:
                del cfg.quantization_config
            cfg.bitnet_train = meta
            if weights:
                model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            else:
                cfg.save_pretrained(tmp)
        finally:
            if had_qc is not None:
                cfg.quantization_config = had_qc
            elif hasattr(cfg, "quantization_config"):
                del cfg.quantization_config
        if not (tmp / "generation_config.json").exists():
            GenerationConfig.from_model_config(cfg).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            (tmp / "bitnet_train.json").write_text(json.dumps(extra, indent=2, sort_keys=True))
        if write_extra is not None:
            write_extra(tmp)
    return path


def bit_backend(model) -> str:
    mods = bitlinear_modules(model)
    return mods[0][1].backend if mods else "auto"


def read_config_json(path: Path) -> dict:
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None


def check_safetensors(path: Path) -> None:
    """Open every ``*.safetensors`` header in ``path``: a truncated or corrupt file is named here
    instead of surfacing as a deserializer traceback."""
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as sf:
                sf.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError
            raise CheckpointError(f"{f}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def load_state_file(f: Path, what: str):
    """``torch.load`` of a training-state file (optimizer.pt, rng.pt) with an error naming it."""
    if not f.is_file():
        raise CheckpointError(f"{f}: missing ({what}); the checkpoint is incomplete")
    try:
        return torch.load(f, weights_only=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - unpickling/zip errors of many kinds
        raise CheckpointError(
            f"{f}: cannot read the {what} (truncated or corrupt?): {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
            f"remove {f.parent.name} to resume from the checkpoint before it"
        ) from None


def load_checkpoint(
    path: str | os.PathLike,
    backend: str = "auto",
    dtype: torch.dtype | None = torch.float32,
    require_causal_lm: bool = True,
    expect_model_type: str | None = None,
    device: str | None = None,
) -> PreTrainedModel:
    """Load a checkpoint directory with :class:`BitLinear` where it is quantized.

    Reads our checkpoints, converted Hugging Face models, and BitNet b1.58 2B4T's bf16 master
    weights (``microsoft/bitnet-b1.58-2B-4T-bf16`` layout: ``quant_method: bitnet`` with
    online quantization). Packed (``offline``) checkpoints are rejected: they hold no latent
    weights to train.

    ``device="meta"`` builds the architecture only, on the meta device, with BitLinear exactly
    where the weights would be ternary, and reads no weights (so a packed checkpoint is fine
    there): the one "build like the checkpoint" sequence, for figures (``info``) and export.
    """
    path = Path(path)
    meta_only = device is not None and torch.device(device).type == "meta"
    raw = read_config_json(path)
    model_type = raw.get("model_type")
    if expect_model_type and model_type != expect_model_type:
        raise CheckpointError(f"{path}: checkpoint is of architecture {model_type!r}, expected {expect_model_type!r}")
    qc = raw.get("quantization_config")
    if qc is not None and qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(
            f"{path}/config.json: quantization_config.quant_method is {qc.get('quant_method')!r}; "
            f"bitnet-train reads only '{QUANT_METHOD}' (or unquantized) checkpoints"
        )
    if qc is not None and qc.get("quantization_mode", "offline") != "online" and not meta_only:
        raise CheckpointError(
            f"{path}/config.json: a packed (quantization_mode: {qc.get('quantization_mode', 'offline')!r}) "
            "checkpoint holds no latent weights to train; use the bf16/online master weights"
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise CheckpointError(f"{path}: config.json cannot be read by transformers: {e}") from None
    archs = raw.get("architectures") or []
    if require_causal_lm and archs and not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        raise CheckpointError(f"{path}: architecture {archs} is not a causal language model (…ForCausalLM)")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if meta_only:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    else:
        kwargs = {}
        if dtype is not None:
            kwargs["dtype"] = dtype
        check_safetensors(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
        except ValueError as e:
            raise CheckpointError(f"{path}: transformers cannot build a causal LM from this checkpoint: {e}") from None
    if qc is not None:
        convert_like_checkpoint(model, qc, backend)
        if qc.get("use_rms_norm") and not meta_only:
            _load_extra_tensors(model, path, suffix=".rms_norm.weight")
    meta = dict(raw.get("bitnet_train") or {})
    meta["quant"] = "bitnet" if qc is not None else "none"
    model.config.bitnet_train = meta
    return model


def convert_like_checkpoint(model: torch.nn.Module, qc: dict, backend: str = "auto") -> list[str]:
    """Swap in BitLinear exactly where stock transformers puts AutoBitLinear for this
    ``quantization_config``: its ``modules_to_not_convert`` list is the whole truth when present."""
    skip = qc.get("modules_to_not_convert")
    return convert_to_bitlinear(
        model,
        exclude=skip or ("lm_head",),
        default_exclude=skip is None,
        backend=backend,
        use_rms_norm=bool(qc.get("use_rms_norm", False)),
        rms_norm_eps=float(qc.get("rms_norm_eps") or 1e-6),
    )


def _iter_safetensors(path: Path):
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors weight files")
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                yield k, sf, f


def _load_extra_tensors(model: torch.nn.Module, path: Path, suffix: str) -> None:
    params = dict(model.named_parameters())
    found = 0
    for key, sf, _f in _iter_safetensors(path):
        if key.endswith(suffix) and key in params:
            with torch.no_grad():
                params[key].copy_(sf.get_tensor(key))
            found += 1
    want = sum(1 for k in params if k.endswith(suffix))
    if found != want:
        raise CheckpointError(f"{path}: expected {want} tensors '*{suffix}', found {found}")


__all__ = [
    "BitLinear",
    "CheckpointError",
    "check_safetensors",
    "load_checkpoint",
    "load_state_file",
    "packed_quantization_config",
    "quantization_config",
    "quantization_config_for",
    "save_checkpoint",
]
