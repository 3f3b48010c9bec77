import torch

import bitnet_train


def test_tiny_forward():
    m = bitnet_train.build_model("tiny", seed=0).eval()
    ids = torch.randint(0, m.config.vocab_size, (1, 8))
    with torch.no_grad():
        out = m(ids).logits
    assert out.shape == (1, 8, m.config.vocab_size)
    assert torch.isfinite(out).all()


def test_repo_root_on_sys_path_does_not_break_transformers():
    """`python -m pytest` (or any python started in the repository root) puts kernels/ on sys.path
    as a top-level `kernels` module, the name transformers probes for the Hugging Face package."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import transformers.modeling_utils, bitnet_train; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
