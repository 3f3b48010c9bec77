"""The quantization reference on edge cases, and its straight-through gradients."""

import pytest
import torch

from bitnet_train import quant

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def naive_weight(w):
    """The formulas written out independently (fp32 numpy-style, elementwise)."""
    wf = w.float()
    s = max(wf.abs().mean().item(), 1e-5)
    s = torch.tensor(s, dtype=torch.float32)
    codes = torch.clamp(torch.round(wf * (1.0 / s)), -1, 1)
    return codes.to(torch.int8), s


def naive_act(x):
    xf = x.float()
    a = 127.0 / xf.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return torch.clamp(torch.round(xf * a), -128, 127).to(torch.int8), a


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 33), (257, 129)])
def test_weight_quant_matches_formula(dtype, shape):
    w = (torch.randn(shape) * 0.02).to(dtype)
    codes, s = quant.weight_quant(w)
    ref_codes, ref_s = naive_weight(w)
    assert codes.dtype == torch.int8 and s.dtype == torch.float32 and s.dim() == 0
    assert torch.equal(codes, ref_codes)
    assert torch.equal(s, ref_s)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    # the fake-quant values are the dequantized codes, in the input dtype
    fq = quant.weight_fake_quant_values(w)
    assert fq.dtype == dtype
    assert torch.equal(fq, quant.weight_dequant(codes, s, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (2, 3, 17), (4, 300)])
def test_act_quant_matches_formula(dtype, shape):
    x = torch.randn(shape).to(dtype) * 3
    codes, a = quant.act_quant(x)
    ref_codes, ref_a = naive_act(x)
    assert codes.dtype == torch.int8 and a.dtype == torch.float32
    assert a.shape == (*shape[:-1], 1)
    assert torch.equal(codes, ref_codes) and torch.equal(a, ref_a)
    fq = quant.act_fake_quant_values(x)
    assert fq.dtype == dtype
    assert torch.equal(fq, quant.act_dequant(codes, a, dtype))
    # the largest magnitude of each token maps to ±127
    assert (codes.abs().amax(-1) == 127).all()


def test_all_zero_tensors():
    w = torch.zeros(8, 8)
    codes, s = quant.weight_quant(w)
    assert torch.equal(codes, torch.zeros_like(codes)) and s.item() == pytest.approx(1e-5)
    assert torch.equal(quant.weight_fake_quant_values(w), w)
    x = torch.zeros(2, 8)
    codes, a = quant.act_quant(x)
    assert torch.equal(codes, torch.zeros_like(codes))
    assert torch.allclose(a, torch.full((2, 1), 127 / 1e-5))
    assert torch.equal(quant.act_fake_quant_values(x), x)


def test_constant_tensors():
    w = torch.full((4, 6), -0.3)
    codes, s = quant.weight_quant(w)
    assert torch.equal(codes, torch.full_like(codes, -1))
    assert s.item() == pytest.approx(0.3)
    assert torch.allclose(quant.weight_fake_quant_values(w), w)
    x = torch.full((3, 5), 2.5)
    codes, a = quant.act_quant(x)
    assert torch.equal(codes, torch.full_like(codes, 127))
    assert torch.allclose(quant.act_fake_quant_values(x), x)


def test_huge_and_tiny_magnitudes():
    w = torch.tensor([[1e30, -1e30, 0.0, 1e-30]])
    codes, s = quant.weight_quant(w)
    assert torch.isfinite(s) and codes.tolist() == [[1, -1, 0, 0]]
    x = torch.tensor([[1e30, -5e29, 1.0], [1e-30, -1e-30, 0.0]])
    codes, a = quant.act_quant(x)
    assert codes[0].tolist() == [127, -64, 0]
    assert codes[1].tolist() == [0, 0, 0]  # below the 1e-5 clamp: everything rounds to 0
    assert torch.isfinite(quant.act_fake_quant_values(x)).all()
    # fp16 input whose scaled value would overflow fp16 is still exact (the math runs in fp32)
    h = torch.tensor([[60000.0, -30000.0, 1.0]], dtype=torch.float16)
    codes, _ = quant.act_quant(h)
    assert codes.tolist() == [[127, -64, 0]]


def test_round_half_to_even():
    # mean|W| = 1 exactly, W/s = ±0.5, ±1.5 are ties: half-to-even gives 0, ±2 -> clamp ±1
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5, 1.0, 1.0, 1.0, 1.0]])
    codes, s = quant.weight_quant(w)
    assert s.item() == 1.0
    assert codes.tolist() == [[0, 0, 1, -1, 1, 1, 1, 1]]
    # activations: max 127 -> a = 1, so x*a = 2.5 -> 2, 3.5 -> 4, -0.5 -> -0
    x = torch.tensor([[127.0, 2.5, 3.5, -0.5, -128.0]])
    codes, a = quant.act_quant(x)
    assert a.item() == pytest.approx(127 / 128)
    x = torch.tensor([[127.0, 2.5, 3.5, -0.5, -126.5]])
    codes, a = quant.act_quant(x)
    assert a.item() == 1.0
    assert codes.tolist() == [[127, 2, 4, 0, -126]]


def test_straight_through_gradients():
    w = torch.randn(5, 7, requires_grad=True)
    x = torch.randn(3, 7, requires_grad=True)
    gw = torch.randn(5, 7)
    gx = torch.randn(3, 7)
    quant.weight_fake_quant(w).backward(gw)
    quant.act_fake_quant(x).backward(gx)
    assert torch.equal(w.grad, gw) and torch.equal(x.grad, gx)
    # the forward is exactly the quantized values (no x + (q - x) rounding)
    assert torch.equal(quant.weight_fake_quant(w), quant.weight_fake_quant_values(w))


def test_quant_lambda_blend():
    w = torch.randn(6, 6, requires_grad=True)
    q = quant.weight_fake_quant_values(w)
    assert torch.equal(quant.weight_fake_quant(w, 0.0), w)
    half = quant.weight_fake_quant(w, 0.5)
    assert torch.allclose(half, w + 0.5 * (q - w), atol=1e-7)
    g = torch.randn(6, 6)
    half.backward(g)
    assert torch.equal(w.grad, g)


def test_bitlinear_reference_shapes_and_grads():
    x = torch.randn(2, 4, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    y = quant.bitlinear_reference(x, w, b)
    ref = torch.nn.functional.linear(quant.act_fake_quant_values(x), quant.weight_fake_quant_values(w), b)
    assert torch.equal(y, ref)
    y.sum().backward()
    # STE: d/dx = ones @ W_q, d/dW = ones^T @ x_q
    wq = quant.weight_fake_quant_values(w)
    assert torch.allclose(x.grad, torch.ones(2, 4, 8) @ wq)
    xq = quant.act_fake_quant_values(x).reshape(-1, 16)
    assert torch.allclose(w.grad, torch.ones(8, 8) @ xq, atol=1e-5)


@pytest.mark.parametrize("out", [4, 8, 12, 256])
def test_hf_pack_roundtrip_and_layout(out):
    codes = torch.randint(-1, 2, (out, 5), dtype=torch.int8)
    packed = quant.pack_hf(codes)
    assert packed.dtype == torch.uint8 and packed.shape == ((out + 3) // 4, 5)
    assert torch.equal(quant.unpack_hf(packed, out), codes)
    # transformers' own packer gives the same bytes
    from transformers.integrations.bitnet import pack_weights

    assert torch.equal(pack_weights(codes.clone()), packed)


def _exact_reference(xq, a, wq, s, out_dtype):
    """The integer product accumulated in int64 (exact by construction), converted to fp32 (exact:
    |acc| <= 128 * K < 2**24), rescaled in fp32 as / a / (1/s), rounded once to out_dtype."""
    acc = (xq.reshape(-1, xq.shape[-1]).long() @ wq.long().t()).float()
    return ((acc / a.reshape(-1, 1)) / (1.0 / s)).to(out_dtype)


@pytest.mark.parametrize("m,n,k", [(1, 7, 5), (19, 33, 70), (64, 96, 1024)])
def test_int_linear_is_the_exact_integer_product(m, n, k):
    x = torch.randn(m, k) * 3
    w = torch.randn(n, k) * 0.02
    xq, a = quant.act_quant(x)
    wq, s = quant.weight_quant(w)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        y = quant.int_linear(xq, a, wq, s, out_dtype=dt)
        assert y.dtype == dt and torch.equal(y, _exact_reference(xq, a, wq, s, dt))
    # leading dims and a bias (added in fp32 before the one rounding)
    b = torch.randn(n)
    y = quant.int_linear(xq.reshape(1, m, k), a.reshape(1, m, 1), wq, s, b, torch.bfloat16)
    assert y.shape == (1, m, n)
    assert torch.equal(y[0], (_exact_reference(xq, a, wq, s, torch.float32) + b).to(torch.bfloat16))


@pytest.mark.parametrize("int8", [True, False])
def test_both_int_gemm_paths_are_exact_at_the_extremes(int8):
    # the int8 product (torch._int_mm) and the fp32 product of integer-valued operands, which
    # _int_gemm picks between by the CPU's speed, give the exact sum, also at its largest magnitude:
    # every code -128 against every weight -1 at the widest K int_linear accepts has |sum| 128 * K
    k = 2**17 - 1
    xq = torch.full((3, k), -128, dtype=torch.int8)
    xq[1, ::2] = 127
    xq[2] = torch.randint(-128, 128, (k,), dtype=torch.int8)
    wq = torch.full((2, k), -1, dtype=torch.int8)
    wq[1] = torch.randint(-1, 2, (k,), dtype=torch.int8)
    ref = (xq.long() @ wq.long().t()).float()
    assert ref.abs().max().item() == 128 * k
    assert torch.equal(quant._int_gemm(xq, wq, int8=int8), ref)
    assert isinstance(quant.cpu_int8_gemm_is_fast(), bool)


def test_compiled_int_gemm_takes_the_cpu_choice_as_a_constant():
    """Under torch.compile the CPU's int8 choice is a constant: dynamo neither traces the probe nor
    warns about it (``train.compile`` would print that warning to every user), and the product is exact."""
    import warnings

    torch._dynamo.reset()
    xq = torch.randint(-128, 128, (5, 64), dtype=torch.int8)
    wq = torch.randint(-1, 2, (3, 64), dtype=torch.int8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(quant._int_gemm, backend="eager", fullgraph=True)(xq, wq)
    assert torch.equal(out, (xq.long() @ wq.long().t()).float())
    assert not [w for w in caught if "Dynamo" in str(w.message)], [str(w.message) for w in caught]


def test_int_linear_refuses_inexact_widths():
    k = 2**17
    with pytest.raises(ValueError, match="in_features 131072"):
        quant.int_linear(torch.zeros(1, k, dtype=torch.int8), torch.ones(1, 1), torch.zeros(2, k, dtype=torch.int8), torch.tensor(1.0))


def test_dequant_one_pass_forms_equal_fake_quant_values():
    x = torch.randn(4, 33) * 2
    w = torch.randn(9, 33) * 0.1
    assert torch.equal(quant.act_dequant(*quant.act_quant(x)), quant.act_fake_quant_values(x))
    assert torch.equal(quant.weight_dequant(*quant.weight_quant(w)), quant.weight_fake_quant_values(w))
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(quant.act_dequant(*quant.act_quant(xb), torch.bfloat16), quant.act_fake_quant_values(xb))
    assert torch.equal(quant.weight_dequant(*quant.weight_quant(wb), torch.bfloat16), quant.weight_fake_quant_values(wb))


def test_blend_with_a_tensor_lambda_equals_the_float_form():
    w = torch.randn(6, 6, requires_grad=True)
    for lam in (0.1, 0.5, 0.77):
        for dt in (torch.float32, torch.bfloat16):
            wd = w.detach().to(dt)
            fq = quant.weight_fake_quant_values(wd)
            assert torch.equal(quant.blend(wd, fq, torch.tensor(lam)), quant.weight_fake_quant(wd, lam))


@pytest.mark.parametrize("shape", [(8, 5), (5, 3), (1, 4), (13, 9)])
def test_hf_layout_round_trip(shape):
    """transformers' packed layout: uint8 [ceil(out/4), in], packed row r holding output rows r, R+r, 2R+r, 3R+r."""
    codes = torch.randint(-1, 2, shape, dtype=torch.int8)
    hf = quant.pack_hf(codes)
    rows = -(-shape[0] // 4)
    assert hf.shape == (rows, shape[1]) and hf.dtype == torch.uint8
    for r in range(shape[0]):
        assert torch.equal(((hf[r % rows] >> (2 * (r // rows))) & 3).to(torch.int8) - 1, codes[r])
    assert torch.equal(quant.unpack_hf(hf, shape[0]), codes)

