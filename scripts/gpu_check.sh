#!/usr/bin/env bash
# The GPU checks of the Triton kernels, in the order to run them, for a session that has a GPU
# (docs/kernels.md). Each step fits in one 10-minute call of a lent machine:
#
#   bash scripts/gpu_check.sh tests        # tests/test_gpu.py + the kernel self-check
#   bash scripts/gpu_check.sh bench        # bitnet-train bench kernels (inference + training)
#   bash scripts/gpu_check.sh bench-fixed  # the same inference table, autotuning off
#   bash scripts/gpu_check.sh all
#
# Output goes to $OUT (the device tool's return folder) or out/gpu-check. Works without
# installing the package (a lent machine may reach no package registry): it is assembled under
# /tmp/pkg from this checkout, with kernels/ and configs/ where setuptools' package-dir puts them.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
if ! python -c "import bitnet_train.kernels.matmul" 2>/dev/null; then
    # the layout comes from pyproject.toml's [tool.setuptools.package-dir] (the one source of it)
    rm -rf /tmp/pkg && mkdir -p /tmp/pkg
    python - <<'PY'
import os, shutil, tomllib
dirs = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"]
for pkg, src in sorted(dirs.items()):  # parents first: bitnet_train, then bitnet_train.kernels, ...
    dst = os.path.join("/tmp/pkg", *pkg.split("."))
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
PY
    export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}
fi
export TRITON_INTERPRET=0  # tests/conftest.py defaults it to 1 (the CPU interpreter)

step() {
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    local t0=$SECONDS
    set +e
    "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    set -e
    echo "== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

what=${1:-all}
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi") | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
case $what in
tests | all)
    step gpu-tests python -m pytest -q -p no:cacheprovider tests/test_gpu.py
    step selfcheck python -m bitnet_train.kernels.selfcheck
    ;;&
bench | all)
    step bench python -m bitnet_train.kernels.bench
    ;;&
bench-fixed | all)
    BITNET_TRAIN_AUTOTUNE=0 step bench-fixed python -m bitnet_train.kernels.bench --no-train
    ;;
tests | bench) ;;
*)
    echo "unknown step $what: tests, bench, bench-fixed or all" >&2
    exit 2
    ;;
esac
