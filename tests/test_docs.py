"""The documentation says what the code does: README.md and docs/*.md against the code.

- the recipe-key tables of docs/recipes.md are what ``bitnet-train recipe-keys --markdown`` prints
  from the recipe schemas (scripts/gen_docs.py writes them), and they cover every stage;
- ``bitnet-train recipe-keys`` runs and lists every key;
- every command and every option of the CLI is named in docs/commands.md;
- every link to a local file (and heading) resolves;
- the README's recipe example is a valid recipe, and the README stays a front page.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from pathlib import Path

import pytest
import yaml

from bitnet_train.cli import build_parser, main
from bitnet_train.commands import RECIPE_STAGES, recipe_schemas
from bitnet_train.recipe import describe, keys_table, load_recipe

from scriptload import load_script

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# docs linked before they are written: the link test leaves them out (empty: every linked doc exists)
PENDING: set[Path] = set()


def test_docs_exist():
    names = {p.name for p in DOCS}
    assert {"README.md", "commands.md", "recipes.md", "export.md", "performance.md", "development.md"} <= names


def test_recipe_key_tables_are_generated_from_the_schemas():
    gen = load_script("gen_docs")
    covered = set()
    for f in DOCS:
        text = f.read_text(encoding="utf-8")
        for stages in gen.blocks(text):
            covered.update(stages)
        assert gen.update(text) == text, f"{f.relative_to(REPO)}: recipe-key tables differ from the schemas; run python scripts/gen_docs.py"
    assert covered == set(RECIPE_STAGES), covered
    # and the generated tables hold every key of every schema
    recipes = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    for stage, schema in recipe_schemas().items():
        for key, *_ in describe(schema):
            assert f"| `{key}` |" in recipes, (stage, key)


def test_gen_docs_detects_drift(tmp_path):
    """A table edited by hand (or a schema changed) is found and rewritten."""
    gen = load_script("gen_docs")
    text = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    tampered = text.replace("| `train.lr` |", "| `train.learning_rate` |", 1)
    assert tampered != text and gen.update(tampered) == text


def test_recipe_keys_command(capsys):
    assert main(["recipe-keys"]) == 0
    out = capsys.readouterr().out
    for stage, schema in recipe_schemas().items():
        assert f"{stage} recipe keys:" in out
        for key, _tp, _default, _help, _allowed in describe(schema):
            assert re.search(rf"^{re.escape(key)}\s", out, re.MULTILINE), (stage, key)
    assert re.search(r"^train\.schedule\s+str\s+cosine\s+cosine, two_stage\s", out, re.MULTILINE)
    assert re.search(r"^train\.max_steps\s+int\s+\(required\)\s+>= 1\s", out, re.MULTILINE)

    assert main(["recipe-keys", "sft", "dpo", "--markdown"]) == 0
    md = capsys.readouterr().out
    assert md == keys_table(recipe_schemas(["sft", "dpo"]), markdown=True)
    assert "| `train.lr` | all | float | sft: `2e-05`; dpo: `2e-07` |" in md
    assert "| `train.beta` | dpo | float | `0.1` |" in md and "| `train.packing` | sft |" in md

    assert main(["recipe-keys", "pretrian"]) == 2
    err = capsys.readouterr().err
    assert "unknown stage 'pretrian'" in err and "pretrain, sft, dpo" in err


def test_describe_reports_types_defaults_and_bounds():
    from bitnet_train.recipe import REQUIRED

    rows = {r[0]: r[1:] for r in describe(recipe_schemas(["pretrain"])["pretrain"])}
    assert rows["train.max_steps"][:2] == ("int", REQUIRED)
    tp, default, help_, allowed = rows["data.val_tokens"]
    assert (tp, default, allowed) == ("int", 65536, ">= 0") and "whole documents" in help_
    assert rows["convert.exclude"][:2] == ("list of str", [])
    assert rows["train.stage2_lr"][:2] == ("float or null", None)
    assert rows["quant"][3] == "bitnet, none"


def _commands():
    """(name as documented, argparse subparser) for every command, nested ones included."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    for name, p in sub.choices.items():
        nested = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        if nested:
            for sname, sp in nested[0].choices.items():
                yield f"{name} {sname}", sp
        else:
            yield name, p


def _sections(text: str) -> dict[str, str]:
    """``### heading`` -> its text, for the level-3 sections of a Markdown file."""
    parts = re.split(r"^### (.+)$", text, flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def test_every_command_and_option_is_documented():
    sections = _sections((REPO / "docs" / "commands.md").read_text(encoding="utf-8"))
    commands = list(_commands())
    assert len(commands) >= 11
    for name, p in commands:
        (heading,) = [h for h in sections if f"`bitnet-train {name}`" in h] or [None]
        assert heading is not None, f"docs/commands.md has no section for bitnet-train {name}"
        body = sections[heading]
        for action in p._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help":
                    assert re.search(rf"{re.escape(opt)}(?![\w-])", body), f"bitnet-train {name} {opt} not in docs/commands.md"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    kept = "".join(c for c in heading if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc")
    return kept.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} (.+?)#*$", text, re.MULTILINE):
        s = _slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def test_slug_matches_github():
    assert _slug("Export: memory, file size (`scripts/bench_export.py`)") == "export-memory-file-size-scriptsbench_exportpy"
    assert _slug("`gguf --quant i2_s`") == "gguf---quant-i2_s"
    assert _slug("`bitnet-train sft` and `bitnet-train dpo`") == "bitnet-train-sft-and-bitnet-train-dpo"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_local_links_resolve(doc):
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    bad = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if dest in PENDING and not dest.exists():
            continue
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not bad, f"{doc.relative_to(REPO)}: " + "; ".join(bad)


def test_readme_is_a_front_page_whose_recipe_validates():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 400
    blocks = re.findall(r"^```yaml\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert blocks, "README.md shows a recipe"
    schema = recipe_schemas(["pretrain"])["pretrain"]
    for block in blocks:
        recipe = load_recipe(schema, data=yaml.safe_load(block))
        assert dataclasses.is_dataclass(recipe)
