"""Triton kernels vs the PyTorch reference (bitnet_train.quant), in Triton's CPU interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest
import torch

import triton  # noqa: E402,F401  (make test installs it; a missing triton fails the suite)

from bitnet_train import quant  # noqa: E402
from bitnet_train import kernels as K  # noqa: E402
from bitnet_train.layers.bitlinear import BitLinear  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
POISON = 99


def _poison_empty(monkeypatch):
    """Make every torch.empty in the kernels module come back filled with NaN (float) or 99
    (integer), so elements a kernel forgets to write fail the comparison."""
    from bitnet_train.kernels import autograd, matmul, quantize

    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else POISON)

    class _Torch:
        def __getattr__(self, name):
            if name == "empty":
                return empty
            return getattr(torch, name)

    for mod in (quantize, matmul, autograd):
        monkeypatch.setattr(mod, "torch", _Torch())


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    _poison_empty(monkeypatch)


def _x(shape, dtype):
    x = torch.randn(shape) * 3
    flat = x.view(-1, shape[-1])
    # first row: exact ties for round-half-to-even (x * a lands on k + 0.5 for a = 127 / 127);
    # the other rows keep random amax so the scale itself is exercised
    flat = flat[:1]
    flat[:, 0] = 127.0
    if shape[-1] > 4:
        flat[:, 1] = 2.5
        flat[:, 2] = -0.5
        flat[:, 3] = 3.5
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (3, 5, 70), (4, 64), (2, 130)])
def test_act_quant_bitexact(shape, dtype):
    x = _x(shape, dtype)
    q, a = K.act_quant(x)
    rq, ra = quant.act_quant(x)
    assert q.dtype == torch.int8 and a.dtype == torch.float32
    assert q.shape == rq.shape and a.shape == ra.shape
    assert torch.equal(q, rq)
    assert torch.equal(a, ra)


def test_act_quant_scale_is_reciprocal_times_127():
    # amax values where 127 / t (true division) != reciprocal(t) * 127 (what torch computes)
    t = torch.rand(4000) * 10 + 1e-3
    t = t[(torch.full_like(t, 127.0) / t) != 127 / t][:24]
    assert t.numel() > 0
    x = torch.randn(t.numel(), 40) * 0.1 * t[:, None]
    x[:, 7] = t
    q, a = K.act_quant(x)
    rq, ra = quant.act_quant(x)
    assert torch.equal(a, ra) and torch.equal(q, rq)


def test_act_quant_ties_and_zero_row():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.0], [0.0] * 9])
    q, a = K.act_quant(x)
    rq, ra = quant.act_quant(x)
    assert torch.equal(q, rq) and torch.equal(a, ra)
    assert q[0, 1:4].tolist() == [0, 2, 2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (33, 70), (300, 5)])
def test_weight_quant(shape, dtype):
    w = (torch.randn(shape) * 0.02).to(dtype)
    q, s = K.weight_quant(w)
    rq, rs = quant.weight_quant(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.dim() == 0
    # scale: different fp32 summation order -> within ~1 ulp
    torch.testing.assert_close(s, rs, rtol=2.5e-7, atol=0)
    # codes: bit-identical given the same scale
    pair = torch.stack([rs, 1.0 / rs])
    assert torch.equal(K.weight_codes(w, pair), rq)
    # and with our own scale, in practice identical too
    assert torch.equal(q, rq)


def test_weight_quant_ties_and_tiny():
    # mean|W| = 1 exactly -> codes of +-0.5, +-1.5 are ties
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5], [1.0, 0.0, 0.5, 2.0]])
    q, s = K.weight_quant(w)
    rq, rs = quant.weight_quant(w)
    assert torch.equal(s, rs) and torch.equal(q, rq)
    z = torch.zeros(3, 5)
    q, s = K.weight_quant(z)
    assert s.item() == pytest.approx(1e-5) and torch.equal(q, torch.zeros(3, 5, dtype=torch.int8))


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (4, 8), (3, 2, 13)])
def test_pack_roundtrip(shape):
    codes = torch.randint(-1, 2, shape, dtype=torch.int8)
    p = K.pack_ternary(codes)
    assert p.dtype == torch.uint8 and p.shape == (*shape[:-1], (shape[-1] + 3) // 4)
    assert torch.equal(K.unpack_ternary(p, shape), codes)


def test_pack_layout():
    codes = torch.tensor([[-1, 0, 1, 1, -1]], dtype=torch.int8)
    p = K.pack_ternary(codes)
    assert p.tolist() == [[0 | 1 << 2 | 2 << 4 | 2 << 6, 0 | 1 << 2 | 1 << 4 | 1 << 6]]


@pytest.mark.parametrize(
    "dtype,m,n,k",
    [(torch.float32, 1, 20, 37), (torch.float32, 19, 33, 70), (torch.bfloat16, 5, 17, 40), (torch.float16, 3, 16, 32)],
)
def test_ternary_matmul(dtype, m, n, k):
    x = (torch.randn(m, k)).to(dtype)
    w = (torch.randn(n, k) * 0.05).to(dtype)
    codes, s = quant.weight_quant(w)
    y = K.ternary_matmul(x, K.pack_ternary(codes), s)
    ref = quant.bitlinear_reference(x.float(), w.float())
    assert y.dtype == dtype and y.shape == (m, n)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
    # exact integer identity: y * a * (1/s) == codes_x @ codes_w^T
    qx, a = quant.act_quant(x)
    exact = (qx.float() @ codes.float().t())
    torch.testing.assert_close((y.float() * a * (1.0 / s)), exact, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=0.5)


def test_ternary_matmul_leading_dims_and_bias():
    x = torch.randn(2, 3, 21)
    w = torch.randn(18, 21) * 0.1
    b = torch.randn(18)
    codes, s = quant.weight_quant(w)
    y = K.ternary_matmul(x, K.pack_ternary(codes), s, bias=b)
    torch.testing.assert_close(y, quant.bitlinear_reference(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dtype,shape,n,bias", [(torch.float32, (2, 3, 37), 19, True), (torch.float32, (1, 16), 16, False), (torch.bfloat16, (4, 24), 10, True)]
)
def test_bitlinear_autograd(dtype, shape, n, bias):
    k = shape[-1]
    lin = BitLinear(k, n, bias=bias, backend="torch").to(dtype)
    x = torch.randn(shape, dtype=dtype)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    w2 = lin.weight.detach().clone().requires_grad_(True)
    b2 = lin.bias.detach().clone().requires_grad_(True) if bias else None

    ref = quant.bitlinear_reference(x1, lin.weight, lin.bias)
    out = K.bitlinear_triton(x2, w2, b2)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    # BitLinear's own torch backend gives the same forward (inference: the fake-quant arithmetic)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), ref, rtol=0, atol=0)

    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(w2.grad, lin.weight.grad, rtol=tol, atol=tol)
    if bias:
        torch.testing.assert_close(b2.grad, lin.bias.grad, rtol=tol, atol=tol)


def test_bitlinear_module_triton_backend():
    lin = BitLinear(24, 12, bias=False, backend="torch")
    x = torch.randn(3, 24)
    ref = lin(x)
    lin.backend = "triton"
    torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)


def test_bitlinear_autograd_mixed_dtypes_under_autocast():
    # bf16 activations, fp32 master weights (autocast-style training)
    w = (torch.randn(12, 20) * 0.1).requires_grad_(True)
    b = torch.randn(12).requires_grad_(True)
    x = torch.randn(2, 5, 20, dtype=torch.bfloat16, requires_grad=True)
    out = K.bitlinear_triton(x, w, b)
    assert out.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = quant.bitlinear_reference(x.detach().float(), w.detach(), b.detach())
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    w_dq = quant.weight_dequant(*quant.weight_quant(w))
    torch.testing.assert_close(x.grad.float(), (torch.ones(2, 5, 12) @ w_dq).float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(b.grad, torch.full((12,), 10.0))


# ---------------------------------------------------------------------------------------------
# RMSNorm fused with the activation quantizer
# ---------------------------------------------------------------------------------------------


def _bitnet_norm(k, eps, w_dtype, seed=0):
    from transformers.models.bitnet.modeling_bitnet import BitNetRMSNorm

    g = torch.Generator().manual_seed(seed)
    norm = BitNetRMSNorm(k, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(k, generator=g) * 1.5 + 0.25)
    return norm.to(w_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", ["same", torch.float32])
@pytest.mark.parametrize("shape,eps", [((1, 1), 1e-6), ((3, 37), 1e-5), ((2, 3, 70), 1e-6), ((4, 130), 1e-5)])
def test_rmsnorm_act_quant_bitexact(shape, eps, dtype, w_dtype):
    w_dtype = dtype if w_dtype == "same" else w_dtype
    k = shape[-1]
    x = _x(shape, dtype)
    norm = _bitnet_norm(k, eps, w_dtype)
    with torch.no_grad():
        y = norm(x)  # transformers' BitNetRMSNorm: the reference
        rq, ra = quant.act_quant(y)
        # the reference's own rsqrt per row: everything downstream of the reduction is bit-exact
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    q, a = K.rmsnorm_act_quant(x, norm.weight, eps, rstd=rstd)
    assert q.dtype == torch.int8 and q.shape == rq.shape and a.shape == ra.shape
    assert torch.equal(q, rq)
    assert torch.equal(a, ra)
    # the kernel's own sum of squares (another fp32 order): scale within ulps, codes equal
    # except where a value sits on a rounding tie (none in random data of this size)
    q2, a2 = K.act_quant(x, norm_weight=norm.weight, eps=eps)
    torch.testing.assert_close(a2, ra, rtol=1e-6, atol=0)
    assert torch.equal(q2, rq)


def test_rmsnorm_act_quant_matches_bitlinear_rms_norm_and_checks_shapes():
    from bitnet_train.layers.bitlinear_torch import BitLinearRMSNorm

    norm = BitLinearRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(6, 48, dtype=torch.bfloat16) * 4
    rq, ra = quant.act_quant(norm(x))
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    q, a = K.rmsnorm_act_quant(x, norm.weight, 1e-6, rstd=rstd)
    assert torch.equal(q, rq) and torch.equal(a, ra)
    with pytest.raises(ValueError, match="norm weight has shape"):
        K.rmsnorm_act_quant(x, torch.ones(47), 1e-6)
    with pytest.raises(ValueError, match="rstd has 5 values for 6 rows"):
        K.rmsnorm_act_quant(x, norm.weight, 1e-6, rstd=torch.ones(5))


# ---------------------------------------------------------------------------------------------
# ternary_matmul: GEMV (decode) and tiled (prefill) paths
# ---------------------------------------------------------------------------------------------


def _check_matmul(x, w, y, bias=None, norm=None):
    """y against the reference fake-quant linear (float rounding) and the exact integer product."""
    dtype = x.dtype
    with torch.no_grad():
        xin = norm(x) if norm is not None else x
    ref = quant.bitlinear_reference(xin.float(), w.float(), None if bias is None else bias.float())
    assert y.dtype == dtype and y.shape == ref.shape
    assert not torch.isnan(y).any(), "unwritten output elements"
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
    if bias is not None and dtype != torch.float32:
        return  # y - bias loses the low bits in 16-bit floats; the reference check covers it
    codes, s = quant.weight_quant(w)
    qx, a = quant.act_quant(xin)
    exact = qx.reshape(-1, x.shape[-1]).float() @ codes.float().t()
    yb = y.float().reshape(exact.shape) - (0 if bias is None else bias.float())
    torch.testing.assert_close(yb * a.reshape(-1, 1) * (1.0 / s), exact, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=0.5)


@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize(
    "dtype,m,n,k",
    [(torch.float32, 1, 21, 37), (torch.bfloat16, 3, 17, 70), (torch.float16, 16, 40, 33), (torch.float32, 16, 16, 32)],
)
def test_ternary_matmul_gemv(monkeypatch, split_k, dtype, m, n, k):
    import bitnet_train.kernels.matmul as ops

    meta, warps, stages = ops.GEMV_FIXED
    monkeypatch.setattr(ops, "GEMV_FIXED", (dict(meta, SPLIT_K=split_k), warps, stages))
    assert m <= ops.GEMV_MAX_M  # m <= GEMV_FUSED_QUANT_MAX_M: the kernel quantizes x itself
    x = _x((m, k), dtype)  # row 0 has exact rounding ties
    w = (torch.randn(n, k) * 0.05).to(dtype)
    bias = torch.randn(n).to(dtype) if split_k == 2 else None
    codes, s = quant.weight_quant(w)
    packed = K.pack_ternary(codes)
    for _ in range(2):  # the second call reuses the workspace the first left zeroed
        y = K.ternary_matmul(x, packed, s, bias=bias)
        _check_matmul(x, w, y, bias)
    for ws, lock in ops._WORKSPACE.values():
        assert not ws.any() and not lock.any(), "the GEMV must leave its workspace zeroed"


@pytest.mark.parametrize("x_split", [True, False])
def test_ternary_matmul_tiled_path_and_fused_norm(monkeypatch, x_split):
    import bitnet_train.kernels.matmul as ops

    meta, warps, stages = ops.MM_FIXED
    monkeypatch.setattr(ops, "MM_FIXED", (dict(meta, X_SPLIT=x_split), warps, stages))

    m = ops.GEMV_MAX_M + 3
    x = torch.randn(m, 45, dtype=torch.bfloat16) * 2
    w = torch.randn(23, 45, dtype=torch.bfloat16) * 0.05
    codes, s = quant.weight_quant(w)
    packed = K.pack_ternary(codes)
    _check_matmul(x, w, K.ternary_matmul(x, packed, s))
    # fused RMSNorm on both paths
    norm = _bitnet_norm(45, 1e-5, torch.float32)
    for rows in (2, m):
        xr = x[:rows]
        y = K.ternary_matmul(xr, packed, s, norm_weight=norm.weight, eps=1e-5)
        _check_matmul(xr, w, y, norm=norm)
    with pytest.raises(ValueError, match="bytes per row"):
        K.ternary_matmul(x, packed[:, :-1], s)
    with pytest.raises(ValueError, match="uint8"):
        K.ternary_matmul(x, codes, s)


# ---------------------------------------------------------------------------------------------
# BitLinear(backend="triton"): weight codes cached per weight version
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_bitlinear_weight_cache(monkeypatch, opt_name):
    import bitnet_train.kernels.autograd as ops  # quantize_weight calls weight_scale from here

    calls = []
    real_scale = ops.weight_scale

    def counting_scale(w):
        calls.append(1)
        return real_scale(w)

    monkeypatch.setattr(ops, "weight_scale", counting_scale)
    torch.manual_seed(0)
    lin = BitLinear(24, 12, bias=True, backend="triton")
    ref = BitLinear(24, 12, bias=True, backend="triton")
    ref.load_state_dict(lin.state_dict())
    ref.cache_weight_codes = False
    opt_cls = torch.optim.SGD if opt_name == "sgd" else torch.optim.AdamW
    opt, ref_opt = opt_cls(lin.parameters(), lr=0.05), opt_cls(ref.parameters(), lr=0.05)
    batches = [torch.randn(3, 24) for _ in range(3)]
    for step in range(2):
        for xb in batches:  # gradient-accumulation micro-batches
            n0 = len(calls)
            y = lin(xb)
            cached = len(calls) - n0
            y.square().sum().backward()
            n0 = len(calls)
            yr = ref(xb)
            assert len(calls) - n0 == 1  # uncached: quantizes every forward
            yr.square().sum().backward()
            assert torch.equal(y, yr)  # cached and uncached paths agree exactly
            assert cached == (1 if xb is batches[0] else 0), f"step {step}: weight quantized {cached}x"
        assert torch.equal(lin.weight.grad, ref.weight.grad)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        assert torch.equal(lin.weight, ref.weight)
    # any in-place write invalidates; so does clear_weight_cache()
    n0 = len(calls)
    with torch.no_grad():
        lin.weight.mul_(-1)
    torch.testing.assert_close(lin(batches[0]), quant.bitlinear_reference(batches[0], lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    lin.clear_weight_cache()
    lin(batches[0])
    assert len(calls) - n0 == 2


# ---------------------------------------------------------------------------------------------
# the benchmark script: its tables run end to end here on the CPU (interpreter, tiny shapes,
# a wall-clock timer instead of do_bench); on a machine without CUDA the command refuses
# ---------------------------------------------------------------------------------------------


def test_bench_tables_run_on_cpu(capsys):
    import argparse
    import time

    from bitnet_train.bench import add_kernels_arguments
    from bitnet_train.kernels import bench

    p = argparse.ArgumentParser()
    add_kernels_arguments(p)
    args = p.parse_args([])
    runs = []

    def timer(fn):
        t0 = time.perf_counter()
        fn()
        fn()  # the rotation moves on between calls
        runs.append(fn)
        return (time.perf_counter() - t0) * 500.0

    bench._matmul_table(args, [1, 16, 18], [(20, 37)], device="cpu", timer=timer)
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("   20x37")]
    assert [r[2] for r in rows] == ["gemvq", "gemv", "tiled"]
    assert all(r[-1] == "ok" and r[-2] == "n/a" for r in rows), out  # checked; no peak known for a CPU
    assert len(runs) == 6


def test_bench_peaks_and_refusal_without_cuda(capsys):
    from bitnet_train import cli
    from bitnet_train.kernels import bench

    assert bench.peaks_for("NVIDIA H100 80GB HBM3")[0] == 3.35e12
    assert bench.peaks_for("NVIDIA H100 PCIe")[0] == 2.0e12
    assert bench.peaks_for("NVIDIA H200")[0] == 4.8e12
    assert bench.peaks_for("NVIDIA A100-SXM4-80GB") is None
    assert cli.main(["bench", "kernels", "--tokens", "x"]) == 2
    assert "--tokens" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["bench", "kernels"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("rows", [1, 3, 16, 17])
def test_bitlinear_triton_decode_uses_packed_gemv(rows):
    torch.manual_seed(0)
    lin = BitLinear(40, 21, bias=True, backend="triton")
    x = torch.randn(1, rows, 40)
    y_train = lin(x)  # autograd path: int8 codes, tiled kernel
    assert lin.weight_codes.packed_entry is None
    with torch.no_grad():
        y_eval = lin(x)
    assert torch.equal(y_eval, y_train.detach())  # same int32 products, same rescale
    assert (lin.weight_codes.packed_entry is not None) == (rows <= 16)
    # a cache filled under inference_mode (generation during training) must not reach autograd
    with torch.no_grad():
        lin.weight.mul_(1.5)  # a new version: the cache is rebuilt inside inference_mode
    with torch.inference_mode():
        lin(x)
    lin(x).sum().backward()
    assert lin.weight.grad is not None
    with torch.no_grad():
        lin.weight.add_(0.01)
        torch.testing.assert_close(lin(x), quant.bitlinear_reference(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_kernels_compile_for_h100():
    """The interpreter cannot see GPU code-generation errors: compile each kernel and path for
    sm_90 with Triton's ptxas (no GPU needed), in a subprocess without TRITON_INTERPRET."""
    import subprocess
    import sys

    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as e:
        pytest.skip(f"Triton's NVIDIA backend is not available: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "bitnet_train.kernels.compilecheck", "--quick"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all ok" in r.stdout and "wgmma" in r.stdout and "s8" in r.stdout


@pytest.mark.parametrize("dtype", [torch.float32])
def test_triton_output_equals_quant_int_linear(dtype):
    # the Triton kernels and the torch backend's exact path (quant.int_linear) compute the same
    # integer product and the same fp32 rescale (+ bias): the same bits. fp32 output only here:
    # Triton's CPU interpreter truncates on a bf16 store (a GPU rounds to nearest even)
    torch.manual_seed(0)
    x = torch.randn(5, 40).to(dtype)
    w = torch.randn(24, 40) * 0.05
    b = torch.randn(24)
    codes, s = quant.weight_quant(w)
    xq, a = quant.act_quant(x)
    exact = quant.int_linear(xq, a, codes, s, b, dtype)
    assert torch.equal(K.ternary_matmul(x, K.pack_ternary(codes), s, bias=b), exact)
    lin = BitLinear(40, 24, bias=True, backend="torch")
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = lin(x.float().requires_grad_(True))
    assert torch.equal(y, exact)


# ---------------------------------------------------------------------------------------------
# shared activation codes on the triton backend (q/k/v and gate/up quantize their input once)
# ---------------------------------------------------------------------------------------------

_SMALL = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
              num_key_value_heads=1, vocab_size=40)


def _count_act_quant(monkeypatch):
    """Count activation quantizations: the Triton kernel's entry (every name it is called by)
    and the torch reference's; returns the two lists of call shapes."""
    from bitnet_train.kernels import autograd, matmul

    triton_calls, torch_calls = [], []
    real_t, real_q = autograd.act_quant, quant.act_quant

    def counting(x, *args, **kwargs):
        triton_calls.append(tuple(x.shape))
        return real_t(x, *args, **kwargs)

    monkeypatch.setattr(autograd, "act_quant", counting)
    monkeypatch.setattr(matmul, "act_quant", counting)
    monkeypatch.setattr(quant, "act_quant", lambda x: (torch_calls.append(tuple(x.shape)), real_q(x))[1])
    return triton_calls, torch_calls


def _unshared_copy(model):
    import copy

    from bitnet_train.layers.bitlinear import bitlinear_modules

    other = copy.deepcopy(model)
    for _, b in bitlinear_modules(other):
        b.act_share = None
    return other


def test_triton_shared_input_quantized_once_and_identical(monkeypatch):
    import bitnet_train
    from bitnet_train.layers.bitlinear import bitlinear_modules, share_input_quantization

    m = bitnet_train.build_model("tiny", seed=7, backend="triton", **_SMALL)
    assert share_input_quantization(m) == [("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                            "model.layers.0.self_attn.v_proj"),
                                           ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")]
    unshared = _unshared_copy(m)
    assert all(b.backend_for(torch.device("cpu")) == "triton" for _, b in bitlinear_modules(m))
    tcalls, qcalls = _count_act_quant(monkeypatch)
    ids = torch.randint(0, 40, (2, 9))  # 18 token rows: the autograd (tiled) path
    out = m(ids).logits
    assert len(tcalls) == 4 and qcalls == [], tcalls  # q/k/v once, o, gate/up once, down
    tcalls.clear()
    ref = unshared(ids).logits
    assert len(tcalls) == 7 and qcalls == []
    assert torch.equal(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (n, p), (_, q) in zip(m.named_parameters(), unshared.named_parameters()):
        assert torch.equal(p.grad, q.grad), n
    # inference: 6 rows take the packed GEMV kernel on shared codes; up to 4 rows that kernel
    # quantizes x itself (nothing to share, no act_quant call at all)
    for rows, shared_calls, unshared_calls in ((6, 4, 7), (3, 0, 0)):
        ids = torch.randint(0, 40, (1, rows))
        with torch.no_grad():
            tcalls.clear()
            out = m(ids).logits
            assert len(tcalls) == shared_calls, (rows, tcalls)
            tcalls.clear()
            ref = unshared(ids).logits
            assert len(tcalls) == unshared_calls, (rows, tcalls)
        assert torch.equal(out, ref), rows
    # the shared codes do not outlive the forward
    assert all(b.act_share is None or b.act_share._entry is None for _, b in bitlinear_modules(m))


@pytest.mark.parametrize("path", ["train", "decode"])
def test_triton_shared_input_is_checked_at_run_time(monkeypatch, path):
    # siblings called on different tensors (or on one modified in place) each get their own codes
    import bitnet_train

    m = bitnet_train.build_model("tiny", seed=8, backend="triton", **_SMALL)
    ref = _unshared_copy(m).model.layers[0].self_attn
    attn = m.model.layers[0].self_attn
    rows = 18 if path == "train" else 6  # decode: the packed GEMV kernel, shared codes given to it
    h, h2 = torch.randn(1, rows, 32), torch.randn(1, rows, 32)
    tcalls, _ = _count_act_quant(monkeypatch)
    with torch.set_grad_enabled(path == "train"):
        y_q = attn.q_proj(h)
        y_k = attn.k_proj(h2)
        assert torch.equal(y_k, ref.k_proj(h2))
        h.mul_(2)
        assert torch.equal(attn.v_proj(h), ref.v_proj(h))
        assert torch.equal(y_q, ref.q_proj(h / 2))
    assert len(tcalls) == 3 + 3  # three different inputs (h, h2, h modified): no reuse, plus the references
    assert y_q.requires_grad == (path == "train")


def test_triton_shared_codes_per_backend(monkeypatch):
    # a group whose members resolved to different backends: each layer gets its own backend's
    # codes (the shared entry is keyed by backend), outputs and gradients as without sharing
    import bitnet_train

    m = bitnet_train.build_model("tiny", seed=9, backend="triton", **_SMALL)
    attn = m.model.layers[0].self_attn
    attn.k_proj.backend = "torch"
    ref = _unshared_copy(m).model.layers[0].self_attn
    tcalls, qcalls = _count_act_quant(monkeypatch)
    h = torch.randn(1, 18, 32, requires_grad=True)
    ys = [attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)]
    # q quantizes (triton); k finds a triton entry and quantizes with torch; v then finds the torch
    # entry and quantizes with triton again
    assert (len(tcalls), len(qcalls)) == (2, 1)
    assert attn.q_proj.act_share._entry is not None  # v's entry waits for uses that do not come ...
    h_ref = h.detach().clone().requires_grad_(True)
    ys_ref = [ref.q_proj(h_ref), ref.k_proj(h_ref), ref.v_proj(h_ref)]
    g = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, g)
    torch.autograd.backward(ys_ref, g)
    for name, y, r in zip(("q", "k", "v"), ys, ys_ref):
        assert torch.equal(y, r), name
        assert torch.equal(getattr(attn, f"{name}_proj").weight.grad, getattr(ref, f"{name}_proj").weight.grad), name
    assert torch.equal(h.grad, h_ref.grad)
    # ... and the next forward's input replaces it (a new tensor: no stale reuse)
    tcalls.clear()
    h3 = torch.randn(1, 18, 32)
    with torch.no_grad():
        assert torch.equal(attn.q_proj(h3), ref.q_proj(h3))
    assert len(tcalls) == 2


def test_bitlinear_triton_rejects_wrong_act_codes():
    x = torch.randn(3, 8)
    w = torch.randn(5, 8)
    xq, a = K.act_quant(x)
    torch.testing.assert_close(K.bitlinear_triton(x, w, act_q=(xq, a)), K.bitlinear_triton(x, w), rtol=0, atol=0)
    with pytest.raises(ValueError, match="bitlinear_triton: act_q codes are torch.int8 \\(2, 8\\)"):
        K.bitlinear_triton(x, w, act_q=(xq[:2], a[:2]))
    with pytest.raises(ValueError, match="act_q scales are torch.float32 \\(3,\\)"):
        K.bitlinear_triton(x, w, act_q=(xq, a.reshape(-1)))
    packed, s = K.pack_ternary(K.weight_quant(w)[0]), K.weight_quant(w)[1]
    with pytest.raises(ValueError, match="ternary_matmul: act_q codes are torch.float32"):
        K.ternary_matmul(x, packed, s, act_q=(xq.float(), a))
    # 3 rows: given codes instead of the GEMV kernel's own quantization, the same bits
    assert torch.equal(K.ternary_matmul(x, packed, s, act_q=(xq, a)), K.ternary_matmul(x, packed, s))
