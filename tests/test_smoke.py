import torch

import bitnet_train


def test_tiny_forward():
    m = bitnet_train.build_model("tiny", seed=0).eval()
    ids = torch.randint(0, m.config.vocab_size, (1, 8))
    with torch.no_grad():
        out = m(ids).logits
    assert out.shape == (1, 8, m.config.vocab_size)
    assert torch.isfinite(out).all()
