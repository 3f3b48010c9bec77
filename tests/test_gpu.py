"""Checks that need a CUDA GPU (skipped on CPU-only machines such as CI)."""

import pytest
import torch

import bitnet_train
from bitnet_train import quant

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_codes_same_on_cuda(dtype):
    torch.manual_seed(0)
    w = (torch.randn(640, 2560) * 0.02).to(dtype)
    x = torch.randn(3, 17, 2560).to(dtype)
    cw, sw = quant.weight_quant(w)
    gw, gs = quant.weight_quant(w.cuda())
    # the fp32 mean may be reduced in another order on the GPU: scales within an ulp, codes equal
    # wherever the scales agree
    assert torch.allclose(sw, gs.cpu(), rtol=2e-7, atol=0)
    if torch.equal(sw, gs.cpu()):
        assert torch.equal(cw, gw.cpu())
    ca, sa = quant.act_quant(x)
    ga, gsa = quant.act_quant(x.cuda())
    assert torch.equal(sa, gsa.cpu()) and torch.equal(ca, ga.cpu())


@cuda
def test_model_trains_on_cuda_bf16():
    m = bitnet_train.build_model("tiny", seed=0, backend="torch").cuda().to(torch.bfloat16)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    ids = torch.randint(0, m.config.vocab_size, (4, 64), device="cuda")
    losses = []
    for _ in range(20):
        loss = m(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
