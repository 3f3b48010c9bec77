"""The package's shape: no import cycle (imports inside functions count) and no module over 450 lines.

Every module of ``bitnet_train`` is parsed (no import runs); its imports at any depth, relative ones
resolved, and the module names a module passes to ``importlib.import_module`` (the CLI's command
modules) form a directed graph over the package's modules. ``kernels/`` in the repository is the
package ``bitnet_train.kernels`` and ``configs/`` is ``bitnet_train.configs`` (pyproject's
package-dir mapping).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "bitnet_train"
# package name -> directory, as in pyproject.toml's [tool.setuptools.package-dir]
ROOTS = {PACKAGE: REPO / "bitnet_train", f"{PACKAGE}.kernels": REPO / "kernels" / "bitnet_kernels"}
MAX_LINES = 450
# modules allowed over MAX_LINES for now, each with the reason; to shrink later
LINE_ALLOWANCES: dict[str, str] = {}  # none: every module is under MAX_LINES


def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    mods: dict[str, Path] = {}
    for pkg, root in ROOTS.items():
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts]
            if any(p.startswith(".") or p == "__pycache__" for p in parts):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([pkg, *parts])
            mods[name] = f
    return mods


def _is_package(name: str, mods: dict[str, Path]) -> bool:
    return mods[name].name == "__init__.py"


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package modules that module ``name`` imports, at any depth of its code."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = name if _is_package(name, mods) else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        # the deepest package module that `target` names (a name imported from a module is not one)
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    dynamic = any(isinstance(n, ast.Attribute) and n.attr == "import_module" for n in ast.walk(tree))
    for node in ast.walk(tree):
        if dynamic and isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in mods:
            # importlib.import_module("bitnet_train.x") (the CLI's command modules) imports x too
            add(node.value)
        elif isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith(PACKAGE):
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                add(sub if sub in mods else mod)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = package_modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {n: WHITE for n in graph}
    stack: list[str] = []

    def visit(n: str):
        color[n] = GREY
        stack.append(n)
        for m in sorted(graph[n]):
            if color[m] == GREY:
                return stack[stack.index(m):] + [m]
            if color[m] == WHITE:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        color[n] = BLACK
        return None

    for n in sorted(graph):
        if color[n] == WHITE:
            c = visit(n)
            if c:
                return c
    return None


def test_graph_sees_the_package():
    graph = import_graph()
    # the walk found the package and resolved relative imports at depth (the CLI imports its
    # command modules by name, the kernels package is reached through bitnet_train.kernels)
    assert "bitnet_train.kernels.matmul" in graph and "bitnet_train.export" in graph
    assert {"bitnet_train.errors", "bitnet_train.training.pretrain", "bitnet_train.align"} <= graph["bitnet_train.cli"]
    assert "bitnet_train.layers.bitlinear" in graph["bitnet_train.modeling.models"]
    assert any(m.startswith("bitnet_train.kernels") for m in graph["bitnet_train.layers.bitlinear"])


def test_find_cycle_reports_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_over_450_lines():
    long = {}
    for name, path in package_modules().items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES and name not in LINE_ALLOWANCES:
            long[name] = n
    assert not long, f"modules over {MAX_LINES} lines: {long} (split them, or add a commented allowance)"
    stale = [n for n in LINE_ALLOWANCES if n in package_modules()
             and len(package_modules()[n].read_text(encoding="utf-8").splitlines()) <= MAX_LINES]
    assert not stale, f"allowances no longer needed, remove them: {stale}"


def test_one_quantization_config_builder():
    """checkpoint.quantization_config builds every quantization_config: the packed HF export's
    must be the one it gives for the checkpoint's own (online) config."""
    from types import SimpleNamespace

    from bitnet_train.checkpoint.format import packed_quantization_config, quantization_config
    from bitnet_train.export.hf import quantization_config as hf_export_config

    for qc in ({"modules_to_not_convert": ["lm_head", "model.layers.0.mlp.gate_proj"], "use_rms_norm": True,
                "rms_norm_eps": 1e-5}, {"quant_method": "bitnet"}):
        assert hf_export_config(SimpleNamespace(qc=qc)) == packed_quantization_config(qc)
    online = quantization_config(["lm_head"])
    assert online["quantization_mode"] == "online" and online["linear_class"] == "autobitlinear"


def test_every_module_says_what_it_holds():
    """Each module opens with a docstring (what it holds), so a reader finds a concept by its module."""
    missing = [name for name, path in package_modules().items()
               if not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))]
    assert not missing, f"modules without a docstring: {missing}"


# The folders of bitnet_train/ in layers (docs/development.md): each imports only from those before it (and
# the kernels and the top-level leaves); the command line's top-level modules import from any.
LAYERS = ("data", "layers", "checkpoint", "modeling", "runtimes", "training", "align", "export", "evaluation")
LEAVES = {"bitnet_train.quant", "bitnet_train.errors", "bitnet_train.fsutil", "bitnet_train.recipe",
          "bitnet_train.cpu_features", "bitnet_train.kernel_bench_args", "bitnet_train.progress"}


def test_folders_import_only_the_layers_below():
    graph = import_graph()

    def folder(m: str) -> str | None:
        parts = m.split(".")
        return parts[1] if len(parts) >= 2 and parts[1] in (*LAYERS, "kernels") else None

    up = []
    for a, bs in graph.items():
        fa = folder(a)
        if fa == "kernels" or (fa is None and a not in LEAVES):
            continue  # the kernels (a package of their own) and the command line
        for b in bs:
            fb = folder(b)
            if fa is None:  # a leaf imports leaves only
                ok = b in LEAVES
            elif fb is None:
                ok = b in LEAVES
            else:
                ok = fb == fa or fb == "kernels" or (fb in LAYERS and LAYERS.index(fb) < LAYERS.index(fa))
            if not ok:
                up.append(f"{a} -> {b}")
    assert sorted(set(folder(m) for m in graph) - {None, "kernels"}) == sorted(LAYERS), "a folder is missing from LAYERS"
    assert not up, "imports against the layers: " + "; ".join(sorted(up))

