"""The policy, the reference model and the tokenizer (with its chat template) of an alignment stage."""

from __future__ import annotations

from pathlib import Path

from bitnet_train.errors import CheckpointError, RecipeError


def load_policy(spec: str, what: str = "model"):
    """A checkpoint (ours, converted HF, 2B4T bf16 layout) or ``hf:<model>`` (see
    :func:`bitnet_train.modeling.models.load_model`) as a BitNet model with BitLinear layers, in float32;
    errors name the key and the problem."""
    import torch

    from bitnet_train.layers.bitlinear import bitlinear_modules
    from bitnet_train.modeling.models import load_model

    try:
        model = load_model(spec, checkpoint_only=True, what=what)
    except CheckpointError as e:
        raise RecipeError(f"{what}: {e}") from None
    if not bitlinear_modules(model):
        raise RecipeError(
            f"{what}: {spec!r} has no ternary (BitLinear) layers; align a BitNet checkpoint, "
            "or convert a full-precision model with model: hf:<dir or hub id>"
        )
    return model.to(torch.float32)


def _tokenizer_source(recipe) -> str:
    if recipe.tokenizer:
        return recipe.tokenizer
    spec = recipe.model
    return spec[3:] if spec.startswith("hf:") else spec


def load_align_tokenizer(recipe):
    """The tokenizer (the model directory's by default) with pad token and the recipe's chat template."""
    from bitnet_train.data.tokenizer import DEFAULT_CHAT_TEMPLATE, ensure_special_tokens, load_tokenizer

    src = _tokenizer_source(recipe)
    tok = load_tokenizer(src, what=f"tokenizer {src!r} (set the tokenizer key)", error=RecipeError, special_tokens=False)
    ct = recipe.chat_template
    if ct is not None:
        if ct == "default":
            tok.chat_template = DEFAULT_CHAT_TEMPLATE
        elif ct.endswith((".jinja", ".j2", ".txt")) and "{" not in ct:
            p = Path(ct)
            if not p.is_file():
                raise RecipeError(f"chat_template: file {ct!r} does not exist")
            tok.chat_template = p.read_text(encoding="utf-8")
        else:
            tok.chat_template = ct
    ensure_special_tokens(tok)
    if tok.eos_token is None:
        raise RecipeError(f"tokenizer {src!r} has no EOS token; the model could not learn to stop")
    check_chat_template(tok)
    return tok


def check_chat_template(tok) -> None:
    """Render a probe conversation; the assistant's text must come out of the template."""
    probe = [{"role": "user", "content": "PROBE_USER_7f3"}, {"role": "assistant", "content": "PROBE_ASSISTANT_9c1"}]
    try:
        text = tok.apply_chat_template(probe, tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja raises many kinds
        raise RecipeError(f"chat_template: cannot render a user/assistant conversation: {e}") from None
    if "PROBE_ASSISTANT_9c1" not in text:
        raise RecipeError(
            "chat_template: the template renders no assistant turn (a user+assistant conversation came out as "
            f"{text[:120]!r}); give a template that writes assistant messages, e.g. chat_template: default"
        )


def load_reference(spec: str):
    """DPO's frozen reference: an independent load of the checkpoint, BitLinear (quantized) forward."""
    model = load_policy(spec, what="ref_model")
    model.eval()
    model.requires_grad_(False)
    return model
