"""``bitnet-train init`` and ``bitnet-train info``."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("init", help="write a randomly initialised checkpoint of a preset")
    p.add_argument("model", help="preset name from configs/ (see `bitnet-train info --list`) or a preset YAML path")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quant", choices=("bitnet", "none"), default="bitnet", help="none: full-precision baseline")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("info", help="parameters, memory and architecture of a preset or checkpoint")
    p.add_argument("model", nargs="?", help="preset name, preset YAML or checkpoint directory")
    p.add_argument("--list", action="store_true", help="list the shipped presets")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "recipe-keys",
        help="every recipe key of a stage: type, default, allowed values, meaning",
        description="Print the recipe keys of pretrain, sft and/or dpo, read from the recipe schemas (the "
        "tables of docs/recipes.md are this command's --markdown output). One stage: its table; several: "
        "one table with a stage column; none: each stage's table in turn.",
    )
    p.add_argument("stages", nargs="*", metavar="STAGE", help=f"one of {', '.join(RECIPE_STAGES)}")
    p.add_argument("--markdown", action="store_true", help="GitHub Markdown tables instead of aligned text")
    p.set_defaults(func=cmd_recipe_keys)


RECIPE_STAGES = ("pretrain", "sft", "dpo")  # the stages that read a recipe (the commands of the same names)


def recipe_schemas(stages=RECIPE_STAGES) -> dict:
    """Stage name -> its recipe schema (a dataclass), for ``recipe-keys`` and scripts/gen_docs.py."""
    from bitnet_train.align import DPORecipe, SFTRecipe
    from bitnet_train.recipe import RecipeError
    from bitnet_train.training.pretrain import PretrainRecipe

    known = {"pretrain": PretrainRecipe, "sft": SFTRecipe, "dpo": DPORecipe}
    bad = [s for s in stages if s not in known]
    if bad:
        raise RecipeError(f"unknown stage {bad[0]!r}; choose from {', '.join(RECIPE_STAGES)}")
    return {s: known[s] for s in dict.fromkeys(stages)}


def cmd_recipe_keys(args) -> int:
    from bitnet_train.recipe import keys_table

    if args.stages:
        print(keys_table(recipe_schemas(args.stages), markdown=args.markdown), end="")
        return 0
    for i, (stage, schema) in enumerate(recipe_schemas().items()):
        title = f"### `{stage}`" if args.markdown else f"{stage} recipe keys:"
        print(("\n" if i else "") + title + "\n" + ("\n" if args.markdown else ""), end="")
        print(keys_table({stage: schema}, markdown=args.markdown), end="")
    return 0


def cmd_init(args) -> int:
    from bitnet_train.checkpoint.format import save_checkpoint
    from bitnet_train.modeling.models import build_model

    model = build_model(args.model, quant=args.quant, seed=args.seed)
    save_checkpoint(model, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({n:,} parameters, quant={args.quant}, seed={args.seed})")
    return 0


def model_summary(spec: str) -> dict:
    """Figures for ``info``: built on the meta device, so even 2B4T costs no memory."""
    from bitnet_train.layers.bitlinear import BitLinear
    from bitnet_train.modeling.models import load_model, load_preset, model_kind

    model = load_model(spec, device="meta")
    kind = model_kind(spec)
    if kind == "checkpoint":
        description = f"checkpoint {Path(spec)}"
    else:
        description = spec if kind == "hf" else load_preset(spec).get("description", "")
    cfg = model.config
    ternary = sum(m.weight.numel() for m in model.modules() if isinstance(m, BitLinear))
    seen = set()
    total = 0
    for prm in model.parameters():
        if id(prm) not in seen:
            seen.add(id(prm))
            total += prm.numel()
    full = total - ternary
    n_bitlinear = sum(1 for m in model.modules() if isinstance(m, BitLinear))
    return {
        "model": spec,
        "description": description,
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None),
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "vocab_size": cfg.vocab_size,
        "hidden_act": getattr(cfg, "hidden_act", None),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
        "parameters": total,
        "ternary_parameters": ternary,
        "full_precision_parameters": full,
        "bitlinear_layers": n_bitlinear,
        "bytes_bf16": total * 2,
        # packed: 2 bits per ternary weight + one fp32 scale per layer; the rest stays bf16
        "bytes_packed": ternary // 4 + 4 * n_bitlinear + full * 2,
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def cmd_info(args) -> int:
    from bitnet_train.modeling.models import configs_dir, list_presets, load_preset

    if args.list or not args.model:
        print(f"presets in {configs_dir()}:")
        for name in list_presets():
            print(f"  {name:12s} {load_preset(name).get('description', '')}")
        return 0
    s = model_summary(args.model)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    rows = [
        ("model", s["model"]),
        ("description", s["description"]),
        ("architecture", f"{s['model_type']}: {s['num_hidden_layers']} layers, hidden {s['hidden_size']}, "
         f"{s['num_attention_heads']} heads / {s['num_key_value_heads']} KV heads, FFN {s['intermediate_size']} "
         f"({s['hidden_act']})"),
        ("vocabulary", f"{s['vocab_size']:,} (embeddings {'tied' if s['tie_word_embeddings'] else 'untied'})"),
        ("context", f"{s['max_position_embeddings']}"),
        ("parameters", f"{s['parameters']:,}"),
        ("  ternary", f"{s['ternary_parameters']:,} in {s['bitlinear_layers']} BitLinear layers"),
        ("  full precision", f"{s['full_precision_parameters']:,} (embeddings, norms, head)"),
        ("memory bf16", _gib(s["bytes_bf16"])),
        ("memory packed", f"{_gib(s['bytes_packed'])} (2 bits per ternary weight, the rest bf16)"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    return 0
