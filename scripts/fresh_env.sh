#!/usr/bin/env bash
# Run make targets in a brand-new virtual environment, as a new user's machine would: nothing
# installed on this machine leaks in (pip's wheel cache may still hold a wheel pip built before,
# llama-cpp-python's above all, which otherwise compiles for about 4.5 minutes on 2 cores).
#
#   bash scripts/fresh_env.sh latest TARGET...   the newest versions pyproject.toml allows
#   bash scripts/fresh_env.sh floors TARGET...   every dependency at its lower bound (.ci/floors.txt)
#
# TARGET is a Makefile target (test, test-fast, demo). The venv goes to $FRESH_ENV_DIR, or to a
# temporary directory that is removed at the end. `make check-latest` / `make check-floors` call this.
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:?usage: scripts/fresh_env.sh latest|floors TARGET...}
shift
[ $# -gt 0 ] || { echo "scripts/fresh_env.sh: name at least one make target" >&2; exit 2; }
case $which in
latest) ;;
floors) export PIP_CONSTRAINT="$PWD/.ci/floors.txt" ;;  # replaces (does not add to) a pip.conf constraint
*) echo "scripts/fresh_env.sh: '$which' is neither latest nor floors" >&2; exit 2 ;;
esac
if [ -n "${FRESH_ENV_DIR:-}" ]; then
    root=$FRESH_ENV_DIR
    rm -rf "$root/venv"
else
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
fi
python3 -m venv "$root/venv"
export VIRTUAL_ENV="$root/venv" PATH="$root/venv/bin:$PATH"
hash -r
python -m pip install -q --upgrade pip
echo "== fresh venv ($which): $VIRTUAL_ENV"
make PYTHON=python "$@"
echo "== versions ($which):"
python - <<'PY'
from importlib.metadata import PackageNotFoundError, version
names = ["torch", "transformers", "accelerate", "datasets", "trl", "tokenizers", "safetensors", "huggingface_hub",
         "kernels", "pyarrow", "numpy", "gguf", "llama_cpp_python", "ik_llama_cpp_python", "lm_eval", "triton", "wandb"]
def v(n):
    try:
        return version(n)
    except PackageNotFoundError:
        return "-"
print("  " + ", ".join(f"{n} {v(n)}" for n in names))
PY
