"""The package as users get it: no folder of the repository shadows a dependency's import name for a
Python started in the repository root, and ``bitnet_train.kernels`` (the folder ``kernels/bitnet_kernels/``,
mapped by pyproject's package-dir) imports from an editable install and from a built wheel."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path, python: str = sys.executable, env: dict | None = None) -> str:
    r = subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600,
                       env=env or os.environ.copy())
    assert r.returncode == 0, f"in {cwd}: {r.stderr[-3000:]}"
    return r.stdout.strip()


def test_no_new_top_level_package():
    """A folder with ``__init__.py`` at the root is a regular package that wins over any installed
    package of that name, for every Python whose sys.path holds the root. Two are: the package, and
    ``configs/`` (``bitnet_train.configs`` through package-dir: setuptools' editable install maps no
    namespace package there), whose name no dependency uses (the next test checks every installed
    name). The Triton kernels sit one level down for that reason (``kernels/bitnet_kernels/``)."""
    regular = sorted(p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert regular == ["bitnet_train", "configs"], regular


def test_repo_root_imports_every_dependency_as_itself():
    """From the repository root, each installed top-level name that matches a folder of ours (Hugging
    Face's ``kernels``, which transformers imports as its models load, above all) is the installed one."""
    installed = importlib.metadata.packages_distributions()
    others = {name for name, dists in installed.items() if set(dists) - {"bitnet-train", "bitnet_train"}}
    clashing = [p.name for p in REPO.iterdir() if p.is_dir() and p.name in others]
    assert "kernels" in clashing or "kernels" not in others  # the case that broke: checked when installed
    code = ("import importlib, sys\n"
            f"for name in {clashing!r}:\n"
            "    m = importlib.import_module(name)\n"
            "    print(name, getattr(m, '__file__', None) or list(m.__path__))\n"
            "import transformers.models.bitnet.modeling_bitnet, transformers.activations, bitnet_train.kernels\n"
            "print('ok')\n")
    out = _run(code, REPO).splitlines()
    assert out[-1] == "ok", out
    for line in out[:-1]:
        name, where = line.split(" ", 1)
        assert str(REPO) not in where, f"{name} imports from the repository: {where}"


def test_editable_install_maps_kernels():
    """Outside the repository the installed ``bitnet_train.kernels`` is kernels/bitnet_kernels/ (an
    editable install, as `make test` makes) or site-packages (a regular one)."""
    code = ("import bitnet_train.kernels as k, bitnet_train.configs as c\n"
            "from bitnet_train.kernels import pack_ternary, ternary_matmul\n"
            "print(k.__file__); print(list(c.__path__)[0])")
    kfile, cdir = _run(code, Path("/")).splitlines()
    if str(REPO) in kfile:  # editable
        assert Path(kfile) == REPO / "kernels" / "bitnet_kernels" / "__init__.py", kfile
    assert (Path(cdir) / "tiny.yaml").is_file(), cdir


def test_wheel_installs_and_imports(tmp_path):
    """Build the wheel from the tracked files, install it alone into a new venv, import it there."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    src = tmp_path / "src"
    for rel in filter(None, files.decode().split("\0")):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("bitnet_train-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    vpy = str(venv / "bin" / "python")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", vpy, "install", "--no-deps", "--no-index", "-q",
                        str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # the dependencies (torch, transformers, ...) from this environment, after the venv's own site-packages
    vsite = _run("import sysconfig; print(sysconfig.get_paths()['purelib'])", tmp_path, vpy)
    Path(vsite, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = ("import importlib.util, bitnet_train, bitnet_train.kernels as k\n"
            "from bitnet_train.kernels import pack_ternary, unpack_ternary\n"
            "import bitnet_train.configs as c, os, torch\n"
            "w = torch.tensor([[-1., 0., 1., 1.]] * 4)\n"
            "assert torch.equal(unpack_ternary(pack_ternary(w), w.shape), w)\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(k.__file__); print(os.path.isfile(os.path.join(list(c.__path__)[0], 'tiny.yaml')));"
            "print(spec.origin if spec else None)")
    kfile, has_cfg, hf_kernels = _run(code, tmp_path, vpy).splitlines()
    assert kfile.startswith(vsite) and kfile.endswith("bitnet_train/kernels/__init__.py"), kfile
    assert has_cfg == "True"
    assert str(REPO) not in hf_kernels and vsite not in hf_kernels, hf_kernels  # HF's package, or none


def test_floors_file_pins_every_lower_bound():
    """.ci/floors.txt (what CI's floors run installs) pins each dependency at pyproject.toml's bound."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    floors = {}
    for line in (REPO / ".ci" / "floors.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            floors[canonicalize_name(name)] = version.split("+")[0]
    for r in reqs:
        lows = [s.version for s in r.specifier if s.operator == ">="]
        assert lows, f"{r} in pyproject.toml has no lower bound"
        pinned = floors.get(canonicalize_name(r.name))
        assert pinned is not None and Version(pinned) == Version(lows[0]), \
            f"{r.name}: pyproject.toml says >={lows[0]}, .ci/floors.txt pins {floors.get(canonicalize_name(r.name))}"
