#!/usr/bin/env bash
# The GPU checks and measurements, for a session that has a GPU (docs/kernels.md, "The prepared GPU
# run"). One call of a lent machine:
#
#   bash scripts/gpu_check.sh run          # every step under a time budget (8 min in all)
#   GPU_RUN_DRY=1 bash scripts/gpu_check.sh run   # the same plumbing on the CPU, tiny sizes (no GPU)
#
# `run` steps, in order (each one's exit code and duration go to $OUT/summary.txt; a failing or
# timed-out step does not stop the others): wheels (install .whl/*.whl, from scripts/gpu_wheels.sh,
# into a --target folder on PYTHONPATH), gpu-tests (tests/test_gpu.py), selfcheck
# (bitnet_train.kernels.selfcheck), bench and bench-fixed (bitnet_train.kernels.bench,
# 2B4T shapes, M = 1, 16, 128, 2048, autotuned, then BITNET_TRAIN_AUTOTUNE=0), train-step
# (scripts/bench_train_step.py: nn.Linear, our backends, _int_mm, torchao, onebitllms), pretrain
# (scripts/bench_pretrain.py --timed-pretrain: 125m, bf16 autocast, bitnet vs none) and fsdp
# (bitnet-train pretrain under `accelerate launch --use_fsdp --num_processes 1`: 2 steps, a sharded
# checkpoint, --resume to 4, against a straight 4-step run). Logs and JSON figures go to
# $GPU_RUN_WORK/logs and are packed after every step into $OUT/results.tar.gz; $OUT holds only
# summary.txt and results.tar.gz (the device tool returns at most 8 files). The tests and the
# self-check run with autotuning off (one fixed configuration: time), the benchmarks with it on.
#
# Older single steps (each within one 10-minute call; output files in $OUT):
#   bash scripts/gpu_check.sh tests        # tests/test_gpu.py + the kernel self-check
#   bash scripts/gpu_check.sh bench        # bitnet-train bench kernels (the inference table)
#   bash scripts/gpu_check.sh bench-fixed  # the same inference table, autotuning off
#   bash scripts/gpu_check.sh all
#
# Works without installing the package (the lent machine reaches no package registry): it is
# assembled under $GPU_RUN_WORK/pkg from this checkout, with kernels/ and configs/ where
# setuptools' package-dir puts them, and put first on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
SELF=$REPO/scripts/gpu_check.sh
PY=${PYTHON:-python3}
DRY=${GPU_RUN_DRY:-0}
what=${1:-all}

if [ "$DRY" = 1 ]; then
    WORK=${GPU_RUN_WORK:-/tmp/gpu-run-dry}
    OUT=${OUT:-out/gpu-run-dry}
    export TRITON_INTERPRET=1  # the Triton kernels in Triton's CPU interpreter
else
    WORK=${GPU_RUN_WORK:-/tmp/gpu-run}
    OUT=${OUT:-out/gpu-check}
    export TRITON_INTERPRET=0  # tests/conftest.py defaults it to 1 (the CPU interpreter)
fi
export GPU_RUN_WORK=$WORK OUT PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=offline
LOGS=$WORK/logs
mkdir -p "$OUT" "$LOGS"
OUT=$(cd "$OUT" && pwd)

assemble() {
    # the layout comes from pyproject.toml's [tool.setuptools.package-dir] (the one source of it)
    rm -rf "$WORK/pkg" && mkdir -p "$WORK/pkg"
    "$PY" - "$WORK/pkg" <<'PY'
import os, shutil, sys, tomllib
dst_root = sys.argv[1]
dirs = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"]
for pkg, src in sorted(dirs.items()):  # parents first: bitnet_train, then bitnet_train.kernels, ...
    dst = os.path.join(dst_root, *pkg.split("."))
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
PY
    export PYTHONPATH=$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}
}

# ------------------------------------------------------------------ internal sub-steps (run by `run`)

case $what in
_bench-cpu | _fsdp) cd "$WORK" ;;
esac
case $what in
_bench-cpu)
    # dry run: the benchmark's own table code on the CPU at a tiny shape (as tests/test_kernels.py drives it)
    exec "$PY" - <<'PY'
import argparse, statistics, time
from bitnet_train.kernels import bench

def timer(fn, reps=2):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)

args = argparse.Namespace(warmup=1, rep=1)
bench._matmul_table(args, [1, 20], [(64, 128)], device="cpu", timer=timer)
PY
    ;;
_fsdp)
    # one-GPU FSDP2 (a one-rank mesh): B = 2 steps with a sharded checkpoint, then --resume to 4;
    # A = 4 steps straight; constant LR, so both runs have the same schedule
    W=$WORK/fsdp
    rm -rf "$W" && mkdir -p "$W"
    port=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    if [ "$DRY" = 1 ]; then size=(--set train.batch_size=4 --set data.seq_len=64); else size=(--set train.batch_size=8 --set data.seq_len=256); fi
    sets=(--set data.path="$REPO/tests/data/tinyshakespeare.txt" --set data.tokenizer=bpe:2048 --set data.val_tokens=4096
          --set train.lr=3e-3 --set train.min_lr=3e-3 --set train.warmup_steps=0 --set train.eval_every=2
          --set train.eval_batches=2 --set train.save_every=2 "${size[@]}")
    launch() {
        "$PY" -m accelerate.commands.launch --use_fsdp --fsdp_version 2 --num_processes 1 --num_machines 1 \
            --mixed_precision no --dynamo_backend no --main_process_port "$port" \
            -m bitnet_train.cli pretrain "$REPO/recipes/tiny.yaml" --no-progress "${sets[@]}" "$@"
    }
    set -e
    echo "== B: 2 steps"; launch --set output_dir="$W/b" --set train.max_steps=2
    echo "== B: --resume to step 4"; launch --set output_dir="$W/b" --set train.max_steps=4 --resume
    echo "== A: 4 steps straight"; launch --set output_dir="$W/a" --set train.max_steps=4
    exec "$PY" - "$W" <<'PY'
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
ck = w / "b" / "checkpoints" / "step-000002"
print("B's step-2 checkpoint:", sorted(p.name for p in ck.iterdir()))
print("  dcp/:", sorted(p.name for p in (ck / "dcp").iterdir()) if (ck / "dcp").is_dir() else "MISSING (not sharded)")
st = json.loads((ck / "trainer_state.json").read_text())
print("  trainer_state: step", st.get("step"), "world_size", st.get("world_size"))
read = lambda d: [json.loads(l) for l in (w / d / "metrics.jsonl").read_text().splitlines() if l.strip()]
a, b = read("a"), read("b")
strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]
print("steps logged: A", [r["step"] for r in a if "loss" in r], "B", [r["step"] for r in b if "loss" in r])
for r1, r2 in zip(a, b):
    print(f"  step {r1['step']}: " + ", ".join(f"{k} A {r1[k]:.6g} B {r2.get(k, float('nan')):.6g}"
                                             for k in ("loss", "val_loss", "grad_norm") if k in r1))
same = strip(a) == strip(b)
worst = max((abs(r1[k] - r2[k]) / max(abs(r1[k]), 1e-12) for r1, r2 in zip(a, b)
             for k in ("loss", "val_loss", "grad_norm") if k in r1 and k in r2), default=float("nan"))
print(f"stopped-and-resumed B == straight A bit for bit: {same}; worst relative difference {worst:.3g}")
print("final/ of A:", sorted(p.name for p in (w / "a" / "final").iterdir()))
sys.exit(0 if (ck / "dcp").is_dir() and [r["step"] for r in b if "loss" in r] == [1, 2, 3, 4] else 1)
PY
    ;;
esac

# ------------------------------------------------------------------ the steps

[ "$what" = run ] && rm -rf "$LOGS" && mkdir -p "$LOGS"  # this run's logs only

if ! (cd "$WORK" && "$PY" -c "import bitnet_train.kernels.matmul") 2>/dev/null || [ "$what" = run ]; then
    assemble  # `run` always tests this checkout's code, even where another copy is installed
fi
# every step runs outside the checkout: Python puts the working directory first on sys.path, and
# the checkout's bitnet_train/ lacks bitnet_train.kernels (kernels/bitnet_kernels/, mapped by package-dir)
cd "$WORK"

# GPU_RUN_STEPS="train-step pretrain" runs only the steps named (e.g. a rerun in the time left).
# the whole run's time budget: 8 minutes on the GPU (a 10-minute call, the machine's start not
# counted); the dry run and the older single steps are not held to it
if [ "$what" = run ] && [ "$DRY" != 1 ]; then BUDGET=${GPU_RUN_BUDGET:-480}; else BUDGET=${GPU_RUN_BUDGET:-36000}; fi
RUN_T0=$SECONDS
DEADLINE=$((SECONDS + BUDGET))
SUMMARY=$OUT/summary.txt

pack() {
    [ "$what" = run ] && tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" logs && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
    return 0
}

# step NAME BUDGET_S CMD...: run CMD (env assignments via `env`) under `timeout`, output to
# $LOGS/NAME.txt; its exit code and duration into the summary. 124 = stopped at its time limit.
step() {
    local name=$1 budget=$2
    shift 2
    if [ -n "${GPU_RUN_STEPS:-}" ] && [[ " $GPU_RUN_STEPS " != *" $name "* ]]; then
        return 0  # not among the steps asked for (a rerun of some steps)
    fi
    local left=$((DEADLINE - SECONDS - 10))
    local limit=$budget
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        echo "step $name: skipped ($((DEADLINE - SECONDS)) s of the run's budget left)" | tee -a "$SUMMARY"
        return 0
    fi
    echo "== $name: $*" >"$LOGS/$name.txt"
    local t0=$SECONDS rc
    if [ -n "${GPU_RUN_LOCK:-}" ]; then  # the dry run on a shared CPU: take its lock per step
        flock "$GPU_RUN_LOCK" timeout -k 10 "$limit" "$@" >>"$LOGS/$name.txt" 2>&1
    else
        timeout -k 10 "$limit" "$@" >>"$LOGS/$name.txt" 2>&1
    fi
    rc=$?
    local note=""
    [ $rc = 124 ] || [ $rc = 137 ] && note=" (stopped at its time limit)"
    echo "step $name: exit $rc in $((SECONDS - t0)) s, limit $limit s$note" | tee -a "$SUMMARY"
    [ "$what" = run ] || cp "$LOGS/$name.txt" "$OUT/$name.txt"
    pack
}

excerpt() {  # the lines of a log worth reading in the call's reply
    local name=$1 pattern=$2
    [ -f "$LOGS/$name.txt" ] || return 0
    echo
    echo "---- $name ($LOGS/$name.txt in results.tar.gz)"
    if [ -n "$pattern" ]; then sed -n "$pattern" "$LOGS/$name.txt"; else tail -n 25 "$LOGS/$name.txt"; fi
}

: >"$SUMMARY"
{
    echo "gpu_check.sh $what$([ "$DRY" = 1 ] && echo ' (dry run on the CPU)') at $(date -u +%FT%TZ), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
} | tee -a "$SUMMARY"

case $what in
run)
    if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
        step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$WORK/site" "$REPO"/.whl/*.whl
        export PYTHONPATH=$PYTHONPATH:$WORK/site
    else
        echo "step wheels: no .whl/*.whl (run scripts/gpu_wheels.sh here and carry .whl): the peers read 'not installed'" | tee -a "$SUMMARY"
    fi
    "$PY" - >"$LOGS/env.txt" 2>&1 <<'PY'
import importlib, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs", "cc", f"{p.major}.{p.minor}")
for name in ("triton", "transformers", "accelerate", "tokenizers", "safetensors", "numpy", "pytest", "torchao", "onebitllms", "bitnet_train"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as e:  # noqa: BLE001
        print(name, "NOT IMPORTABLE:", type(e).__name__, e)
PY
    sed -n '1,20p' "$LOGS/env.txt" | tee -a "$SUMMARY"
    if [ "$DRY" = 1 ]; then
        step gpu-tests 300 env BITNET_TRAIN_AUTOTUNE=0 "$PY" -m pytest -q -rs -p no:cacheprovider "$REPO/tests/test_gpu.py"
        step selfcheck 60 env BITNET_TRAIN_AUTOTUNE=0 "$PY" -m bitnet_train.kernels.selfcheck
        step bench 300 bash "$SELF" _bench-cpu
        step bench-fixed 300 env BITNET_TRAIN_AUTOTUNE=0 bash "$SELF" _bench-cpu
        step train-step 400 "$PY" "$REPO/scripts/bench_train_step.py" --device cpu --shapes small --tokens 1,20 --reps 1 \
            --modes bf16,autocast --json "$LOGS/train_step.json"
        step pretrain 400 "$PY" "$REPO/scripts/bench_pretrain.py" --timed-pretrain 5 --tp-preset tiny --tp-batch 4 --tp-seq 128 \
            --tp-tokenizer bpe:2048 --tp-skip 2 --tp-out "$WORK/pretrain" --tp-json "$LOGS/pretrain.json"
        step fsdp 400 bash "$SELF" _fsdp
    else
        step gpu-tests 45 env BITNET_TRAIN_AUTOTUNE=0 "$PY" -m pytest -q -rs -p no:cacheprovider "$REPO/tests/test_gpu.py"
        step selfcheck 20 env BITNET_TRAIN_AUTOTUNE=0 "$PY" -m bitnet_train.kernels.selfcheck
        step bench 110 "$PY" -m bitnet_train.kernels.bench
        step bench-fixed 20 env BITNET_TRAIN_AUTOTUNE=0 "$PY" -m bitnet_train.kernels.bench
        step train-step 130 "$PY" "$REPO/scripts/bench_train_step.py" --modes "${GPU_RUN_TRAIN_MODES:-bf16}" \
            --json "$LOGS/train_step.json"
        step pretrain 95 "$PY" "$REPO/scripts/bench_pretrain.py" --timed-pretrain "${GPU_RUN_PRETRAIN_S:-25}" \
            --tp-out "$WORK/pretrain" --tp-json "$LOGS/pretrain.json"
        step fsdp 50 bash "$SELF" _fsdp
    fi
    {
        echo
        echo "run: $((SECONDS - RUN_T0)) s in all (budget $BUDGET s); full logs and JSON in results.tar.gz (logs/)"
        excerpt gpu-tests '$p'
        excerpt selfcheck '/FAIL/p;$p'
        excerpt bench '/^device:/,$p'
        excerpt bench-fixed '/^autotune:/,$p'
        excerpt train-step '/^summary:/,$p'
        excerpt pretrain '/^timed pretraining/,$p'
        excerpt fsdp '/^B.s step-2/,$p'
    } >>"$SUMMARY"
    pack
    cat "$SUMMARY"
    ;;
tests | bench | bench-fixed | all)
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$SUMMARY"
    case $what in tests | all)
        step gpu-tests 600 "$PY" -m pytest -q -p no:cacheprovider "$REPO/tests/test_gpu.py"
        step selfcheck 600 "$PY" -m bitnet_train.kernels.selfcheck ;;
    esac
    case $what in bench | all) step bench 600 "$PY" -m bitnet_train.kernels.bench ;; esac
    case $what in bench-fixed | all) step bench-fixed 600 env BITNET_TRAIN_AUTOTUNE=0 "$PY" -m bitnet_train.kernels.bench ;; esac
    ;;
*)
    echo "unknown step $what: run, tests, bench, bench-fixed or all" >&2
    exit 2
    ;;
esac
