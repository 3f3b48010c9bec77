"""YAML recipes validated against dataclass schemas, with ``--set key.path=value`` overrides.

Each stage (pretrain, sft, dpo, ...) declares its recipe as nested dataclasses (one config class
per stage, as TRL does). :func:`load_recipe` reads the YAML, applies overrides, and builds the
dataclasses, failing before anything runs with an error naming the file, the key path, the bad
value and what is allowed. Unknown keys are errors.

Field metadata understood here:

* ``choices``: allowed values (``field(default="bitnet", metadata={"choices": ("bitnet", "none")})``)
* ``help``: one line shown in error messages and ``bitnet-train recipe-keys``
* ``min`` / ``max``: numeric bounds
* ``resume``: what ``--resume`` does when the key (or, on a section's field, any key below it)
  differs from the checkpoint's recipe: ``"refuse"`` (it decides the data or the model) or
  ``"warn"`` (the schedule, the step's size); read by :func:`resume_rules`
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


from bitnet_train.errors import RecipeError


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str, file: str = "recipe") -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, file)
            except RecipeError as e:
                errors.append(e)
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            # a single value stands for a one-element list
            value = [value]
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]", file) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads `1e-3` (no dot) as a string; take it as the number it means
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"{where}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, file, where)
    return value


def build(cls, data: Any, file: str = "recipe", prefix: str = ""):
    """Instantiate dataclass ``cls`` from a mapping, validating every key.

    Errors read ``FILE: KEY.PATH: problem``."""
    here = prefix or "(top level)"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{file}: {here}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    removed = getattr(cls, "REMOVED_KEYS", {})
    for k in data:
        if k in removed:
            raise RecipeError(f"{file}: {_join(prefix, str(k))}: {removed[k]}")
        if k not in fields:
            raise RecipeError(
                f"{file}: unknown key {_join(prefix, str(k))!r}; allowed keys at {here}: {', '.join(sorted(fields))}"
            )
    kwargs = {}
    try:
        for name, f in fields.items():
            path = _join(prefix, name)
            if name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise RecipeError(f"missing required key {path!r}" + _help(f))
                continue
            value = _coerce(data[name], hints[name], path, file)
            _check_meta(value, f, path)
            kwargs[name] = value
    except RecipeError as e:
        msg = str(e)
        raise RecipeError(msg if msg.startswith(f"{file}: ") else f"{file}: {msg}") from None
    obj = cls(**kwargs)
    post = getattr(obj, "validate", None)
    if callable(post):
        try:
            post()
        except RecipeError as e:
            msg = str(e)
            raise RecipeError(msg if msg.startswith(f"{file}: ") else f"{file}: {msg}") from None
    return obj


def resume_rules(schema, prefix: str = "") -> dict[str, str]:
    """``{key path: "refuse" | "warn"}`` from the ``resume`` metadata of ``schema``'s fields (a
    section's rule covers every key below it)."""
    hints = typing.get_type_hints(schema)
    out = {}
    for f in dataclasses.fields(schema):
        path = _join(prefix, f.name)
        rule = (f.metadata or {}).get("resume")
        if rule is not None:
            out[path] = rule
        elif dataclasses.is_dataclass(hints[f.name]):
            out.update(resume_rules(hints[f.name], path))
    return out


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _help(f) -> str:
    h = f.metadata.get("help") if f.metadata else None
    return f" ({h})" if h else ""


def _check_meta(value, f, path: str) -> None:
    meta = f.metadata or {}
    choices = meta.get("choices")
    if choices is not None and value is not None and value not in choices:
        raise RecipeError(f"{path}: {value!r} is not allowed; choose one of {', '.join(map(str, choices))}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value is not None and value < lo:
        raise RecipeError(f"{path}: {value!r} is below the minimum {lo}")
    if hi is not None and value is not None and value > hi:
        raise RecipeError(f"{path}: {value!r} is above the maximum {hi}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` → (["train", "lr"], 0.0003); the value is parsed as YAML."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {text!r}: bad key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str], schema=None) -> dict:
    """Apply ``--set`` overrides to the raw mapping (checked against ``schema`` when given)."""
    for text in overrides or ():
        parts, value = parse_override(text)
        node = data
        cls = schema
        for i, part in enumerate(parts[:-1]):
            if cls is not None:
                cls = _field_type(cls, parts[: i + 1], text)
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(f"--set {text!r}: {'.'.join(parts[: i + 1])} is not a mapping")
            node = nxt
        if cls is not None:
            _field_type(cls, parts, text)
        node[parts[-1]] = value
    return data


def _field_type(cls, parts: list[str], text: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    name = parts[-1]
    if name in getattr(cls, "REMOVED_KEYS", {}):
        raise RecipeError(f"--set {text!r}: {'.'.join(parts)}: {cls.REMOVED_KEYS[name]}")
    if name not in fields:
        raise RecipeError(
            f"--set {text!r}: unknown key {'.'.join(parts)!r}; allowed keys here: {', '.join(sorted(fields))}"
        )
    tp = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    for a in args:
        if dataclasses.is_dataclass(a):
            return a
    return None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}:{line} not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def load_recipe(schema, path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None):
    """Read, override and validate a recipe into an instance of the dataclass ``schema``."""
    if data is None:
        data = read_yaml(path) if path is not None else {}
    where = str(path) if path is not None else "recipe"
    try:
        data = apply_overrides(data, overrides or [], schema)
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    return build(schema, data, where)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


class _Required:
    """The default of a key that has none (shown as ``(required)``)."""

    def __repr__(self) -> str:
        return "(required)"


REQUIRED = _Required()


def describe(schema, prefix: str = "") -> list[tuple[str, str, Any, str, str]]:
    """Rows (key path, type, default, help, allowed values) of every key of ``schema``, nested
    sections flattened (``train.lr``), in declaration order: what ``bitnet-train recipe-keys``
    prints and docs/recipes.md shows. A key without a default has :data:`REQUIRED`."""
    rows = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if not f.init:
            continue
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        sub = [a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp) or sub:
            rows.extend(describe(sub[0] if sub else tp, path + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        meta = f.metadata or {}
        rows.append((path, _type_name(tp), default, meta.get("help", ""), _allowed(meta)))
    return rows


def _allowed(meta) -> str:
    if meta.get("choices") is not None:
        return ", ".join(map(_value_text, meta["choices"]))
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"{_value_text(lo)} to {_value_text(hi)}"
    if lo is not None:
        return f">= {_value_text(lo)}"
    if hi is not None:
        return f"<= {_value_text(hi)}"
    return ""


def _value_text(v) -> str:
    """A value as it is written in a recipe (YAML)."""
    if v is REQUIRED:
        return "(required)"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value_text(x) for x in v) + "]"
    return str(v) if not isinstance(v, float) else repr(v)


def _md(text: str) -> str:
    """Table-cell text for Markdown: pipes escaped, angle brackets kept visible."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def keys_table(schemas: dict[str, type], markdown: bool = False) -> str:
    """The recipe keys of one or several stages (``{"sft": SFTRecipe, ...}``) as one table.

    Several stages make one table with a ``stage`` column (``all``, or the stages that have the
    key); where the stages' defaults, types or help differ, each stage's is given, named. Text
    output is aligned columns; ``markdown`` a GitHub table (the one docs/recipes.md holds)."""
    names = list(schemas)
    merged: dict[str, dict[str, tuple]] = {}
    order: list[str] = []
    for stage, schema in schemas.items():
        at = -1
        for row in describe(schema):
            key = row[0]
            if key not in merged:
                merged[key] = {}
                order.insert(at + 1, key)
            at = order.index(key)
            merged[key][stage] = row[1:]

    def cell(per_stage: dict[str, tuple], i: int, fmt) -> str:
        vals = {s: fmt(v[i]) for s, v in per_stage.items()}
        if len(set(vals.values())) == 1:
            return next(iter(vals.values()))
        return "; ".join(f"{s}: {v}" for s, v in vals.items())

    code = (lambda t: f"`{t}`" if t else "") if markdown else (lambda t: t)
    plain = _md if markdown else (lambda t: t)

    def default_text(v) -> str:
        return "(required)" if v is REQUIRED else code(_value_text(v))

    header = ["key"] + (["stage"] if len(names) > 1 else []) + ["type", "default", "allowed", "meaning"]
    body = []
    for key in order:
        per = merged[key]
        stage = ["all" if len(per) == len(names) else ", ".join(per)] if len(names) > 1 else []
        allowed = cell(per, 3, lambda a: ", ".join(map(code, a.split(", "))) if a else "")
        body.append([code(key), *stage, cell(per, 0, plain), cell(per, 1, default_text), allowed, cell(per, 2, plain)])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines) + "\n"
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header) - 1)]
    fmt_row = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]  # noqa: E731
    return "\n".join(fmt_row(r).rstrip() for r in [header, *body]) + "\n"
