#!/usr/bin/env bash
# Download the wheels the lent GPU machine lacks into .whl/ (git-ignored), for
# `bash scripts/gpu_check.sh run` there (docs/kernels.md, "The prepared GPU run"). That machine
# reaches no package registry; its image has torch 2.11.0+cu130, triton 3.6.0, transformers,
# accelerate, tokenizers, safetensors, pyyaml, tqdm, numpy, pyarrow, matplotlib and pytest (with
# pytest-timeout): everything bitnet_train imports for the run's steps. Missing there: the two peers
# of the training-step benchmark.
#
#   torchao 0.17.0     its first release whose import check asks for torch >= 2.11.0; its C++
#                      extensions link libcudart.so.13 (CUDA 13, as torch 2.11.0+cu130). The BitNet
#                      training path (torchao.prototype.quantized_training.bitnet) is Python + Triton.
#                      No install requirements.
#   onebitllms 0.0.4   py3-none-any; requires torch, transformers, tqdm, accelerate, safetensors,
#                      huggingface-hub, setuptools: all in the image.
#
# The command is the device README's (Python 3.12, manylinux x86_64, --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=("torchao==0.17.0" "onebitllms==0.0.4")
mkdir -p .whl
for w in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "$w"
done
# one version of each (two would stop the install there)
for name in torchao onebitllms; do
    n=$(ls .whl | grep -c "^$name-" || true)
    if [ "$n" != 1 ]; then
        echo "gpu_wheels: .whl holds $n wheels of $name; keep one" >&2
        exit 1
    fi
done
ls -l .whl
du -sh .whl
