"""``bitnet-train convert HF_MODEL --out DIR``: turn a Hugging Face causal LM into a ternary model.

Every eligible ``nn.Linear`` (attention and MLP projections, fused ones included) becomes a
:class:`~bitnet_train.layers.bitlinear.BitLinear` holding the same latent weights; embeddings, norms and
the output head stay full precision (more with ``--exclude``). The result is a checkpoint in our
format (:mod:`bitnet_train.checkpoint.format`): stock transformers loads it with the same quantized
semantics through its ``quantization_config`` (``quant_method: bitnet``,
``linear_class: autobitlinear``, ``quantization_mode: online``, ``use_rms_norm`` for the optional
RMSNorm on every BitLinear input).

A recipe reaches the same code with ``model: hf:<dir or hub id>`` (converted on load, see
:func:`load_hf_converted`); the ``convert:`` recipe keys (:class:`ConvertConfig`) hold the
exclusion list and the RMSNorm switch. Naive conversion loses most of what the model knew; the
quantization warm-up (``quant_warmup``, :mod:`bitnet_train.training.quant_warmup`) and a short fine-tune bring
it back (docs/performance.md, "Quantization-aware fine-tuning").
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bitnet_train.errors import ModelSpecError


@dataclass
class ConvertConfig:
    """Recipe keys for ``model: hf:...`` (and for a full-precision checkpoint with ``quant: bitnet``)."""

    exclude: list[str] = field(
        default_factory=list,
        metadata={"help": "modules kept full precision besides the output head (names, globs such as '*.gate', or name suffixes)"},
    )
    use_rms_norm: bool = field(default=False, metadata={"help": "RMSNorm on every BitLinear input (transformers' use_rms_norm)"})
    rms_norm_eps: float | None = field(
        default=None, metadata={"min": 0.0, "help": "eps of that RMSNorm; default: the model's rms_norm_eps, else 1e-6"}
    )
    sub_norm: bool = field(
        default=False, metadata={"help": "SubLN: a Llama-shaped model becomes a BitNetForCausalLM with RMSNorms "
                                 "before o_proj and down_proj"})
    sub_norm_init: str = field(
        default="calibrated", metadata={"choices": ("calibrated", "ones"),
                                        "help": "the sub-norms' weights: the mean RMS of their input on a built-in "
                                                "English sample (the fp model stays close), or 1 (BitNet Distillation's)"})


def _is_bitnet_checkpoint(src: str) -> bool:
    cfg = Path(src) / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config")
    except json.JSONDecodeError:
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "bitnet"


def load_hf_model(src: str, dtype=None, device: str | None = None):
    """A Hugging Face causal LM (local directory or hub id) in full precision, unconverted
    (``device="meta"``: the architecture only, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    where = f"hf:{src}"
    if _is_bitnet_checkpoint(src):
        raise ModelSpecError(
            f"model {where!r} is already a ternary (quantization_config.quant_method: bitnet) checkpoint; "
            "give the directory itself as the model, without hf:"
        )
    try:
        if device is not None and torch.device(device).type == "meta":
            config = AutoConfig.from_pretrained(src)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        else:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSpecError(f"model {where!r}: cannot load it as a local directory or a hub model: {first}") from None
    except ValueError as e:
        raise ModelSpecError(f"model {where!r}: transformers cannot build a causal LM from it: {e}") from None
    return model


# Llama-shaped blocks: attention q/k/v/o, a gated MLP gate/up/down, pre-norms; what BitNet adds is
# the two sub-norms. The config keys that must hold for the block to be that shape.
SUB_NORM_TYPES = ("llama", "mistral", "qwen2")


def calibration_ids(tokenizer, tokens: int = 2048, seq_len: int = 256):
    """``[tokens // seq_len, seq_len]`` token ids of English text that ships with Python (CPython's
    pydoc topics, as ``data.path: builtin:pydoc``): the sample :func:`with_sub_norms` calibrates on."""
    import torch

    from bitnet_train.data.documents import BUILTIN_PYDOC, iter_documents

    ids: list[int] = []
    for doc in iter_documents(BUILTIN_PYDOC, max_chars=tokens * 8):
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            break
    n = max(1, min(len(ids), tokens) // seq_len)
    return torch.tensor(ids[: n * seq_len]).reshape(n, -1)


def _input_rms(model, ids) -> dict[str, float]:
    """The mean per-token RMS of the input of every ``o_proj`` and ``down_proj`` of ``model`` on ``ids``."""
    import torch

    found, hooks = {}, []
    for name, mod in model.named_modules():
        if name.endswith(("self_attn.o_proj", "mlp.down_proj")):
            def hook(_m, args, _out, name=name):
                x = args[0].float()
                found[name] = x.pow(2).mean(-1).sqrt().mean().item()
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=ids.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return found


def sub_norm_sample(src, model, init: str):
    """The calibration ids for ``sub_norm_init`` (None for ``ones`` or a model on the meta device),
    tokenized with the tokenizer saved beside model ``src``."""
    if init == "ones" or next(model.parameters()).is_meta:
        return None
    from bitnet_train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(src, what=f"model {str(src)!r} (sub_norm_init: calibrated tokenizes a sample with its "
                                   "tokenizer; sub_norm_init: ones needs none)")
    return calibration_ids(tok)


def with_sub_norms(model, where: str = "model", calibrate=None):
    """SubLN (BitNet Distillation's first stage): the same weights in a ``BitNetForCausalLM`` with
    an RMSNorm (the model's eps) before each attention output projection (``attn_sub_norm``) and
    each FFN down projection (``ffn_sub_norm``). ``hidden_act``, tying, the rotary settings and
    ``head_dim`` are kept; Qwen2's q/k/v bias becomes ``attention_bias`` (and ``o_proj`` gets a
    zero bias). A model whose block is not Llama-shaped is refused, naming the key.

    An RMSNorm is not the identity: it divides each token's input of those projections by its RMS.
    With weights 1 (``calibrate=None``) the result computes another function until it is trained.
    ``calibrate`` (token ids, :func:`calibration_ids`) sets each norm's weights to the mean RMS of
    its input over those tokens, measured in ``model``: a token whose input has that RMS then
    passes unchanged, and the full-precision model stays close to the original (the figures are
    in docs/performance.md)."""
    import torch
    from transformers import BitNetConfig, BitNetForCausalLM

    c = model.config
    mt = getattr(c, "model_type", None)
    if mt not in SUB_NORM_TYPES:
        raise ModelSpecError(f"{where}: sub_norm needs a Llama-shaped block ({', '.join(SUB_NORM_TYPES)}); "
                             f"config.model_type is {mt!r}")
    if getattr(c, "mlp_bias", False):
        raise ModelSpecError(f"{where}: config.mlp_bias is true; BitNet's MLP has no biases")
    sw = getattr(c, "sliding_window", None)
    if sw is not None and (mt != "qwen2" or getattr(c, "use_sliding_window", False)) \
            and sw < getattr(c, "max_position_embeddings", 0):
        raise ModelSpecError(f"{where}: config.sliding_window is {sw}; BitNet's attention is global")
    bias = bool(getattr(c, "attention_bias", False)) or mt == "qwen2"
    keys = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
                rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
                attention_bias=bias, rope_parameters=getattr(c, "rope_parameters", None),
                bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    cfg = BitNetConfig(**keys)
    first = next(model.parameters())
    if first.is_meta:  # the architecture only
        with torch.device("meta"):
            new = BitNetForCausalLM(cfg)
        new.config.bitnet_train = dict(getattr(model.config, "bitnet_train", None) or {})
        return new
    dtype = first.dtype
    new = BitNetForCausalLM(cfg).to(dtype)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    allowed = (".attn_sub_norm.weight", ".ffn_sub_norm.weight", ".o_proj.bias")
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    bad = list(unexpected) + [k for k in missing if not k.endswith(allowed)]
    if bad:
        raise ModelSpecError(f"{where}: tensor {bad[0]!r} has no place in a BitNet block ({len(bad)} such)")
    rms = _input_rms(model, calibrate) if calibrate is not None else {}
    site = {"attn_sub_norm": "o_proj", "ffn_sub_norm": "down_proj"}
    with torch.no_grad():
        for name in missing:  # the new norms start at 1 (or the calibrated RMS), Qwen2's new o_proj bias at 0
            p = new.get_parameter(name)
            if name.endswith(".bias"):
                p.zero_()
            else:
                block, norm = name[: -len(".weight")].rsplit(".", 1)  # model.layers.i.self_attn, attn_sub_norm
                p.fill_(rms.get(f"{block}.{site[norm]}", 1.0))
    new.generation_config = model.generation_config
    new.config.bitnet_train = dict(getattr(model.config, "bitnet_train", None) or {})
    return new


def _rms_eps(model, rms_norm_eps):
    if rms_norm_eps is not None:
        return float(rms_norm_eps)
    eps = getattr(model.config, "rms_norm_eps", None)
    return float(eps) if isinstance(eps, (int, float)) and eps > 0 else 1e-6


def convert_model(model, exclude=(), use_rms_norm: bool = False, rms_norm_eps: float | None = None,
                  backend: str = "auto", where: str = "model", include=None) -> list[str]:
    """Convert a loaded full-precision model in place; errors (ModelSpecError) name the module."""
    from bitnet_train.layers.bitlinear import convert_to_bitlinear

    try:
        return convert_to_bitlinear(
            model,
            exclude=list(exclude or ()),
            include=include,
            backend=backend,
            use_rms_norm=use_rms_norm,
            rms_norm_eps=_rms_eps(model, rms_norm_eps),
        )
    except ValueError as e:
        raise ModelSpecError(f"{where}: cannot convert {type(model).__name__} to BitLinear: {e}") from None


def load_hf_converted(
    src: str,
    backend: str = "auto",
    quant: str = "bitnet",
    exclude=(),
    use_rms_norm: bool = False,
    rms_norm_eps: float | None = None,
    dtype=None,
    include=None,
    device: str | None = None,
    sub_norm: bool = False,
    sub_norm_init: str = "calibrated",
):
    """``hf:<src>``: a Hugging Face causal LM, converted to BitLinear on load (``quant='none'``
    loads it as it is, for a full-precision baseline or fine-tune); with ``sub_norm`` first made
    a BitNet model with sub-norms (:func:`with_sub_norms`, with either ``quant``)."""
    if quant not in ("bitnet", "none"):
        raise ModelSpecError(f"quant must be 'bitnet' or 'none', got {quant!r}")
    model = load_hf_model(src, dtype, device)
    if sub_norm:
        model = with_sub_norms(model, where=f"model 'hf:{src}'", calibrate=sub_norm_sample(src, model, sub_norm_init))
    converted = []
    if quant == "bitnet":
        converted = convert_model(model, exclude, use_rms_norm, rms_norm_eps, backend, where=f"model 'hf:{src}'",
                                  include=include)
    model.config.bitnet_train = {"quant": quant, "source": f"hf:{src}", "converted": len(converted),
                                 **({"sub_norm": True} if sub_norm else {})}
    return model


def convert_hf(
    src: str,
    out,
    exclude=(),
    use_rms_norm: bool = False,
    rms_norm_eps: float | None = None,
    include=None,
    dtype=None,
    tokenizer: bool = True,
    sub_norm: bool = False,
    sub_norm_init: str = "calibrated",
) -> dict:
    """Convert Hugging Face model ``src`` (dir or hub id) and write it as a checkpoint at ``out``
    (atomically). Returns a summary: converted and full-precision module names, parameters."""
    import torch

    from bitnet_train.checkpoint.format import save_checkpoint
    from bitnet_train.data.tokenizer import load_tokenizer

    model = load_hf_converted(src, exclude=exclude, use_rms_norm=use_rms_norm, rms_norm_eps=rms_norm_eps,
                              dtype=dtype, include=include, sub_norm=sub_norm,
                              sub_norm_init=sub_norm_init)
    tok = None
    if tokenizer:
        try:
            tok = load_tokenizer(src, what=f"model 'hf:{src}'")
        except ModelSpecError as e:
            print(f"convert: note: {e}; the checkpoint is written without a tokenizer", file=sys.stderr)
    kept = sorted(n for n, m in model.named_modules() if type(m) is torch.nn.Linear)
    from bitnet_train.layers.bitlinear import bitlinear_modules

    bit = bitlinear_modules(model)
    n_bit = sum(m.weight.numel() for _, m in bit)
    n_all = sum(p.numel() for p in model.parameters())
    save_checkpoint(model, out, tokenizer=tok, extra={"stage": "convert", "source": f"hf:{src}"})
    return {
        "out": str(out),
        "architecture": type(model).__name__,
        "converted": [n for n, _ in bit],
        "full_precision_linear": kept,
        "ternary_params": n_bit,
        "params": n_all,
        "use_rms_norm": use_rms_norm,
        "sub_norm": sub_norm,
    }


# ----------------------------------------------------------------------------- CLI


def register(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a Hugging Face causal LM into a ternary BitNet checkpoint",
        description="Swap every eligible Linear layer of a Hugging Face causal LM for BitLinear (weights "
        "copied; embeddings, output head and norms stay full precision) and write a checkpoint that both "
        "bitnet-train and stock transformers load with the same quantized semantics.",
    )
    p.add_argument("model", metavar="HF_MODEL", help="local model directory or hub id (e.g. HuggingFaceTB/SmolLM2-135M)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="keep these modules full precision too (name, glob like '*.mlp.gate', or suffix; repeatable)")
    p.add_argument("--include", action="append", default=None, metavar="PATTERN",
                   help="convert only these modules (repeatable); default: every eligible Linear")
    p.add_argument("--rms-norm", action="store_true", help="add an RMSNorm on every BitLinear input (use_rms_norm)")
    p.add_argument("--rms-norm-eps", type=float, default=None, help="its eps (default: the model's rms_norm_eps, else 1e-6)")
    p.add_argument("--sub-norm", action="store_true",
                   help="SubLN: make a Llama-shaped model (Llama, Mistral, SmolLM, Qwen2) a BitNetForCausalLM with "
                        "RMSNorms before o_proj and down_proj")
    p.add_argument("--sub-norm-init", choices=("calibrated", "ones"), default="calibrated",
                   help="their weights: the mean RMS of their input on a built-in English sample (default), or 1")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the saved latent weights (default float32)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    import torch

    s = convert_hf(
        args.model, args.out, exclude=args.exclude, include=args.include, use_rms_norm=args.rms_norm,
        rms_norm_eps=args.rms_norm_eps, dtype=getattr(torch, args.dtype), sub_norm=args.sub_norm,
        sub_norm_init=args.sub_norm_init,
    )
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(
        f"convert: {s['architecture']}: {len(s['converted'])} Linear layers -> BitLinear "
        f"({s['ternary_params']:,} of {s['params']:,} parameters ternary); kept full precision: "
        f"{', '.join(s['full_precision_linear']) or 'no Linear'} plus embeddings and norms"
        f"{'; RMSNorm on BitLinear inputs' if s['use_rms_norm'] else ''}"
        f"{'; sub-norms before o_proj and down_proj (BitNetForCausalLM)' if s['sub_norm'] else ''}; wrote {s['out']}",
        file=sys.stdout,
    )
    return 0
