"""The BitNet model family: presets from ``configs/``, model construction, and model loading.

The architecture is transformers' own BitNet (``BitNetForCausalLM``); we only swap its
``nn.Linear`` layers for :class:`~bitnet_train.layers.bitlinear.BitLinear`. Checkpoints (save and load)
live in :mod:`bitnet_train.checkpoint.format`.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import BitNetConfig, BitNetForCausalLM, PreTrainedModel

from bitnet_train.layers.bitlinear import convert_to_bitlinear
from bitnet_train.errors import ModelSpecError

# keys a preset YAML may hold besides BitNetConfig's own fields
_PRESET_META = {"description", "inherit"}
_ALLOWED_KEYS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_theta",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_dropout",
}
_ACTIVATIONS = ("relu2", "silu")


def configs_dir() -> Path:
    """Where the shipped presets live (``configs/`` in the repository, packaged as data)."""
    return Path(str(resources.files("bitnet_train.configs")))


def list_presets() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ModelSpecError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ModelSpecError(f"{path}: a model preset must be a mapping of keys, got {type(data).__name__}")
    return data


def _resolve_preset_path(name_or_path: str | os.PathLike) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ModelSpecError(f"model preset file {str(p)!r} does not exist")
        return p
    cand = configs_dir() / f"{name_or_path}.yaml"
    if cand.is_file():
        return cand
    raise ModelSpecError(
        f"unknown model preset {str(name_or_path)!r}; known presets: {', '.join(list_presets())} "
        "(or give a path to a .yaml file, or a checkpoint directory)"
    )


def load_preset(name_or_path: str | os.PathLike, _seen: tuple = ()) -> dict[str, Any]:
    """The merged key/value mapping of a preset (``inherit:`` resolved), validated."""
    path = _resolve_preset_path(name_or_path)
    if path.resolve() in _seen:
        raise ModelSpecError(f"{path}: 'inherit' forms a cycle")
    data = _read_yaml(path)
    merged: dict[str, Any] = {}
    if "inherit" in data:
        parent = data["inherit"]
        if not isinstance(parent, str):
            raise ModelSpecError(f"{path}: key 'inherit' must be a preset name, got {parent!r}")
        parent_path = parent if parent.endswith((".yaml", ".yml")) else parent
        if parent.endswith((".yaml", ".yml")) and not Path(parent).is_absolute():
            parent_path = str(path.parent / parent)
        merged.update(load_preset(parent_path, _seen + (path.resolve(),)))
    for key, value in data.items():
        if key in _PRESET_META:
            continue
        if key not in _ALLOWED_KEYS:
            raise ModelSpecError(
                f"{path}: unknown key {key!r}; allowed keys: {', '.join(sorted(_ALLOWED_KEYS | _PRESET_META))}"
            )
        merged[key] = value
    merged["description"] = data.get("description", merged.get("description", ""))
    _validate(merged, path)
    return merged


def _validate(spec: dict, where) -> None:
    ints = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
    ]
    for k in ints:
        if k in spec and (not isinstance(spec[k], int) or isinstance(spec[k], bool) or spec[k] <= 0):
            raise ModelSpecError(f"{where}: key {k!r} must be a positive integer, got {spec[k]!r}")
    act = spec.get("hidden_act", "relu2")
    if act not in _ACTIVATIONS:
        raise ModelSpecError(f"{where}: key 'hidden_act' is {act!r}; allowed: {', '.join(_ACTIVATIONS)}")
    h, nh = spec.get("hidden_size"), spec.get("num_attention_heads")
    if h and nh and h % nh:
        raise ModelSpecError(f"{where}: hidden_size {h} is not divisible by num_attention_heads {nh}")
    nkv = spec.get("num_key_value_heads")
    if nh and nkv and nh % nkv:
        raise ModelSpecError(f"{where}: num_attention_heads {nh} is not divisible by num_key_value_heads {nkv}")


def preset_to_config(spec: dict[str, Any], **overrides) -> BitNetConfig:
    """A transformers ``BitNetConfig`` from a preset mapping (plus keyword overrides)."""
    spec = {**spec, **overrides}
    spec = {k: v for k, v in spec.items() if k not in _PRESET_META}
    theta = spec.pop("rope_theta", 500000.0)
    spec["rope_parameters"] = {"rope_type": "default", "rope_theta": float(theta)}
    # a preset builds a model from scratch: no BOS/EOS of a tokenizer it does not know yet
    spec.setdefault("bos_token_id", None)
    spec.setdefault("eos_token_id", None)
    return BitNetConfig(**spec)


def build_model(
    preset_or_config: str | os.PathLike | dict | BitNetConfig,
    quant: str = "bitnet",
    backend: str = "auto",
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> PreTrainedModel:
    """A randomly initialised BitNet model (``quant='none'`` keeps full-precision Linear layers)."""
    if quant not in ("bitnet", "none"):
        raise ModelSpecError(f"quant must be 'bitnet' or 'none', got {quant!r}")
    if isinstance(preset_or_config, BitNetConfig):
        config = preset_or_config
        for k, v in overrides.items():
            setattr(config, k, v)
    elif isinstance(preset_or_config, dict):
        _validate(preset_or_config, "model spec")
        config = preset_to_config(preset_or_config, **overrides)
    else:
        config = preset_to_config(load_preset(preset_or_config), **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    model = BitNetForCausalLM(config).to(dtype)
    if quant == "bitnet":
        convert_to_bitlinear(model, backend=backend)
    model.config.bitnet_train = {"quant": quant}
    return model


def model_kind(spec: str | os.PathLike) -> str:
    """What a ``model:`` string names: ``"hf"`` (``hf:<dir or hub id>``), ``"checkpoint"`` (a
    directory) or ``"preset"`` (a preset name or YAML)."""
    s = str(spec)
    if s.startswith("hf:"):
        return "hf"
    return "checkpoint" if Path(s).is_dir() else "preset"


def load_model(
    preset_or_path: str | os.PathLike,
    backend: str = "auto",
    *,
    quant: str | None = None,
    convert=None,
    tokenizer=None,
    seed: int | None = None,
    checkpoint_only: bool = False,
    device: str | None = None,
    what: str = "model",
    **kwargs,
) -> PreTrainedModel:
    """The one place a ``model:`` string becomes a model: a preset name or preset YAML (a random
    initialisation, :func:`build_model`), a checkpoint directory (ours, a converted Hugging Face
    model, or a BitNet b1.58 2B4T bf16-layout directory, with its weights), or ``hf:<dir or hub
    id>`` (a Hugging Face causal LM converted to BitLinear on load).

    ``quant``: ``"bitnet"`` (the default for presets and ``hf:``) or ``"none"``; for a checkpoint
    ``None`` takes it as it is, ``"none"`` refuses a ternary one and ``"bitnet"`` converts a
    full-precision one like ``hf:`` does. ``convert`` (a :class:`~bitnet_train.modeling.convert.ConvertConfig`)
    holds the exclusions and the RMSNorm switch of such a conversion. ``tokenizer``: a preset takes
    its vocabulary and special tokens; a loaded model must have an embedding for each of its tokens.
    ``seed`` seeds a preset's initialisation.
    ``checkpoint_only`` refuses presets (``what`` names the recipe key in that error).
    ``device="meta"``: the architecture only (no weights read), for figures. Other keyword
    arguments go to the builder (:func:`build_model`, :func:`~bitnet_train.checkpoint.format.load_checkpoint`
    or :func:`~bitnet_train.modeling.convert.load_hf_converted`).
    """
    from bitnet_train.layers.bitlinear import bitlinear_modules
    from bitnet_train.errors import RecipeError

    spec = str(preset_or_path)
    kind = model_kind(spec)
    if checkpoint_only and kind == "preset":
        raise RecipeError(f"{what}: {spec!r} is not a checkpoint directory (or hf:<model>)")
    c = convert
    if kind == "hf":
        from bitnet_train.modeling.convert import load_hf_converted

        if quant is not None:
            kwargs["quant"] = quant
        if c is not None:
            kwargs.update(exclude=c.exclude, use_rms_norm=c.use_rms_norm, rms_norm_eps=c.rms_norm_eps,
                          sub_norm=c.sub_norm, sub_norm_init=c.sub_norm_init)
        model = load_hf_converted(spec[3:], backend=backend, device=device, **kwargs)
    elif kind == "checkpoint":
        from bitnet_train.checkpoint.format import load_checkpoint

        model = load_checkpoint(Path(spec), backend=backend, device=device, **kwargs)
        if quant == "none" and model.config.bitnet_train.get("quant") == "bitnet":
            raise RecipeError(f"quant: none, but model {spec!r} is a ternary checkpoint")
        if quant == "bitnet" and not bitlinear_modules(model):
            # a full-precision checkpoint fine-tuned into ternary: convert it like hf:<dir>
            from bitnet_train.modeling.convert import convert_model, sub_norm_sample, with_sub_norms

            if c is not None and c.sub_norm:
                model = with_sub_norms(model, where=f"model {spec!r}",
                                       calibrate=sub_norm_sample(spec, model, c.sub_norm_init))
            convert_model(model, *((c.exclude, c.use_rms_norm, c.rms_norm_eps) if c is not None else ()),
                          backend=backend, where=f"model {spec!r}")
            model.config.bitnet_train = {**(model.config.bitnet_train or {}), "quant": "bitnet"}
    else:
        if quant is not None:
            kwargs["quant"] = quant
        if seed is not None:
            kwargs["seed"] = seed
        if tokenizer is not None:
            kwargs.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        if device is not None:
            with torch.device(device):
                return build_model(spec, backend=backend, **kwargs)
        return build_model(spec, backend=backend, **kwargs)
    if tokenizer is not None:
        n_emb = model.get_input_embeddings().weight.shape[0]
        if n_emb < len(tokenizer):
            name = getattr(tokenizer, "name_or_path", "")
            raise RecipeError(
                f"model {spec!r} has {n_emb} token embeddings, fewer than the {len(tokenizer)} tokens of "
                f"{f'tokenizer {name!r}' if name else 'the tokenizer'}; use the model's own tokenizer"
            )
    return model
