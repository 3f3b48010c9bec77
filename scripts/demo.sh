#!/usr/bin/env bash
# The README demo. Until pretraining lands: init a tiny BitNet, describe it, run a forward pass.
set -euo pipefail
OUT=${OUT:-runs/demo}
bitnet-train init tiny --out "$OUT/init" --seed 0
bitnet-train info "$OUT/init"
python3 - "$OUT/init" <<'PY'
import sys, torch
from bitnet_train import load_model
m = load_model(sys.argv[1]).eval()
ids = torch.randint(0, m.config.vocab_size, (1, 16))
with torch.no_grad():
    print("forward pass logits:", tuple(m(ids).logits.shape))
PY
