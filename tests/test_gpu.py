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


# --- Triton kernels compiled for the GPU (the CPU tests run them in the interpreter) ----------


@cuda
@pytest.mark.parametrize("m", [1, 3, 16, 17, 300])
@pytest.mark.parametrize("n,k", [(2560, 2560), (640, 2560), (2560, 6912), (333, 1001)])
def test_ternary_matmul_paths_on_cuda(m, n, k):
    from bitnet_train import kernels as K
    from bitnet_train.kernels import matmul as ops

    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    codes, s = quant.weight_quant(w)
    packed = K.pack_ternary(codes)
    ref = quant.bitlinear_reference(x.float(), w.float())
    qx, a = quant.act_quant(x)
    exact = qx.float() @ codes.float().t()
    for _ in range(2):  # the GEMV workspace must come back zeroed
        y = K.ternary_matmul(x, packed, s)
        assert not torch.isnan(y).any()
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
        # fp32 output: the integer product exactly, up to the rescale's rounding
        y32 = K.ternary_matmul(x.float(), packed, s)
        torch.testing.assert_close(y32 * a * (1.0 / s), exact, rtol=1e-5, atol=0.5)
    for ws, lock in ops._WORKSPACE.values():
        assert not ws.any() and not lock.any()


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rmsnorm_act_quant_on_cuda(dtype):
    from transformers.models.bitnet.modeling_bitnet import BitNetRMSNorm

    from bitnet_train import kernels as K

    torch.manual_seed(0)
    norm = BitNetRMSNorm(2560, eps=1e-5).cuda()
    with torch.no_grad():
        norm.weight.uniform_(0.25, 2.0)
    x = (torch.randn(7, 33, 2560, device="cuda") * 3).to(dtype)
    with torch.no_grad():
        rq, ra = quant.act_quant(norm(x))
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    q, a = K.rmsnorm_act_quant(x, norm.weight, 1e-5, rstd=rstd)
    assert torch.equal(q, rq) and torch.equal(a, ra)
    q2, a2 = K.rmsnorm_act_quant(x, norm.weight, 1e-5)
    torch.testing.assert_close(a2, ra, rtol=1e-6, atol=0)
    assert (q2 != rq).float().mean().item() < 1e-4  # only rounding ties may flip


@cuda
def test_bitlinear_triton_weight_cache_on_cuda():
    from bitnet_train.layers.bitlinear import BitLinear

    torch.manual_seed(0)
    lin = BitLinear(512, 384, backend="triton").cuda()
    ref = BitLinear(512, 384, backend="torch").cuda()
    ref.load_state_dict(lin.state_dict())
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3, fused=True)
    for _ in range(3):
        x = torch.randn(4, 64, 512, device="cuda")
        key0 = (lin.weight_codes.triton_entry or (None,))[0]
        y = lin(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-4)
        y.sum().backward()
        y2 = lin(x)  # second micro-batch of the same step: the cached codes
        assert lin.weight_codes.triton_entry[0] != key0 and torch.equal(y, y2)
        opt.step()
        opt.zero_grad()
        ref.load_state_dict(lin.state_dict())


@cuda
def test_triton_shared_input_on_cuda():
    # q/k/v and gate/up share the Triton act_quant codes on the GPU too: the same output bits as
    # the same layers without sharing, in bf16 (training forward and the decoding GEMV path), and
    # the same gradient bits (compared layer by layer: a whole model's backward holds atomics)
    import copy

    from bitnet_train.layers.bitlinear import bitlinear_modules
    from bitnet_train.kernels import autograd, matmul

    m = bitnet_train.build_model("tiny", seed=3, backend="triton", num_hidden_layers=2).cuda().to(torch.bfloat16)
    unshared = copy.deepcopy(m)
    for _, b in bitlinear_modules(unshared):
        b.act_share = None
    calls = []
    real = autograd.act_quant

    def counting(x, *args, **kwargs):
        calls.append(1)
        return real(x, *args, **kwargs)

    autograd.act_quant = matmul.act_quant = counting
    try:
        ids = torch.randint(0, m.config.vocab_size, (2, 64), device="cuda")
        out, n_shared = m(ids).logits, len(calls)
        ref = unshared(ids).logits
        assert (n_shared, len(calls) - n_shared) == (4 * 2, 7 * 2)
        assert torch.equal(out, ref)
        with torch.no_grad():
            ids = torch.randint(0, m.config.vocab_size, (1, 12), device="cuda")  # the packed GEMV path
            assert torch.equal(m(ids).logits, unshared(ids).logits)
        attn, attn_ref = m.model.layers[0].self_attn, unshared.model.layers[0].self_attn
        h = torch.randn(2, 64, m.config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        h_ref = h.detach().clone().requires_grad_(True)
        ys = [getattr(attn, f"{n}_proj")(h) for n in "qkv"]
        ys_ref = [getattr(attn_ref, f"{n}_proj")(h_ref) for n in "qkv"]
        g = [torch.randn_like(y) for y in ys]
        torch.autograd.backward(ys, g)
        torch.autograd.backward(ys_ref, g)
        for n, y, r in zip("qkv", ys, ys_ref):
            assert torch.equal(y, r) and torch.equal(getattr(attn, f"{n}_proj").weight.grad, getattr(attn_ref, f"{n}_proj").weight.grad), n
        assert torch.equal(h.grad, h_ref.grad)
    finally:
        autograd.act_quant = matmul.act_quant = real
