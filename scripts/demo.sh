#!/usr/bin/env bash
# The README demo: pretrain the tiny ternary BitNet on CPython's help texts (no download), a few
# minutes on a CPU, then sample from the result with stock transformers.
set -euo pipefail
OUT=${OUT:-runs/demo}
RESUME=()
# a second run continues (or, when finished, just re-saves) instead of refusing to overwrite
[ -d "$OUT/checkpoints" ] && RESUME=(--resume)
bitnet-train pretrain recipes/tiny.yaml --set output_dir="$OUT" "${RESUME[@]}" "$@"
echo "validation loss by step:"
python3 - "$OUT" <<'PY'
import json, sys
for line in open(f"{sys.argv[1]}/metrics.jsonl"):
    r = json.loads(line)
    if "val_loss" in r:
        print(f"  step {r['step']:>4}: {r['val_loss']:.3f}")
PY
python3 - "$OUT/final" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # stock transformers
torch.manual_seed(0)
ids = tok("The for statement", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=40, do_sample=True, top_k=20, pad_token_id=tok.pad_token_id)
print("sample:", tok.decode(out[0], skip_special_tokens=True))
PY
