"""Correctness self-check of the kernels on a real GPU (compiled Triton, not the interpreter).

    python -m bitnet_train.kernels.selfcheck

Compares codes and scales bit for bit with :mod:`bitnet_train.quant`, the matmul and the
BitLinear autograd function within float rounding, on shapes larger than the CPU tests use.
Exits non-zero on the first mismatch.
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    from bitnet_train import quant
    from bitnet_train import kernels as K

    if not torch.cuda.is_available():
        print("selfcheck: no CUDA device")
        return 2
    dev = "cuda"
    torch.manual_seed(0)
    fails = 0

    def check(name, ok, extra=""):
        nonlocal fails
        print(f"{'ok  ' if ok else 'FAIL'} {name} {extra}")
        fails += 0 if ok else 1

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in [(1, 1), (1, 2560), (7, 3, 1000), (2048, 6912), (5, 8193)]:
            x = (torch.randn(shape, device=dev) * 3).to(dtype)
            x.view(-1, shape[-1])[:1, 0] = 127.0
            q, a = K.act_quant(x)
            rq, ra = quant.act_quant(x)
            check(f"act_quant {dtype} {shape}", torch.equal(q, rq) and torch.equal(a, ra))
        for shape in [(1, 1), (37, 1001), (2560, 2560), (6912, 2560)]:
            w = (torch.randn(shape, device=dev) * 0.02).to(dtype)
            q, s = K.weight_quant(w)
            rq, rs = quant.weight_quant(w)
            codes_same = torch.equal(K.weight_codes(w, torch.stack([rs, 1.0 / rs])), rq)
            rel = ((s - rs).abs() / rs).item()
            check(f"weight_quant {dtype} {shape}", codes_same and rel <= 2.5e-7,
                  f"scale rel diff {rel:.2e}, own-scale codes equal: {torch.equal(q, rq)}")

        from transformers.models.bitnet.modeling_bitnet import BitNetRMSNorm

        norm = BitNetRMSNorm(2560, eps=1e-5).to(dev)
        with torch.no_grad():
            norm.weight.uniform_(0.25, 2.0)
            x = (torch.randn(9, 2560, device=dev) * 3).to(dtype)
            rq, ra = quant.act_quant(norm(x))
            rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
        q, a = K.rmsnorm_act_quant(x, norm.weight, 1e-5, rstd=rstd)
        check(f"rmsnorm_act_quant {dtype} (reference rsqrt)", torch.equal(q, rq) and torch.equal(a, ra))
        q, a = K.rmsnorm_act_quant(x, norm.weight, 1e-5)
        rel = ((a - ra).abs() / ra).max().item()
        check(f"rmsnorm_act_quant {dtype} (own rsqrt)", rel <= 1e-6, f"scale rel diff {rel:.2e}, "
              f"codes differing {(q != rq).sum().item()}")

    for dtype in (torch.float32, torch.bfloat16):
        for m, n, k in [(1, 2560, 2560), (3, 6912, 2560), (16, 640, 2560), (17, 2560, 2560), (128, 6912, 2560),
                        (333, 2560, 6912), (7, 17, 37), (2048, 2560, 6912)]:
            x = torch.randn(m, k, device=dev).to(dtype)
            w = (torch.randn(n, k, device=dev) * 0.02).to(dtype)
            codes, s = quant.weight_quant(w)
            y = K.ternary_matmul(x, K.pack_ternary(codes), s)
            ref = quant.bitlinear_reference(x.float(), w.float())
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            check(f"ternary_matmul {dtype} {(m, n, k)}", err <= tol, f"max rel err {err:.2e}")

        x = torch.randn(4, 33, 512, device=dev, dtype=dtype)
        w = (torch.randn(384, 512, device=dev) * 0.02).to(dtype)
        b = torch.randn(384, device=dev, dtype=dtype)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
        b1, b2 = b.clone().requires_grad_(), b.clone().requires_grad_()
        ref = quant.bitlinear_reference(x1, w1, b1)
        out = K.bitlinear_triton(x2, w2, b2)
        g = torch.randn_like(ref)
        ref.backward(g)
        out.backward(g)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        for name, u, v in [("out", out, ref), ("grad_x", x2.grad, x1.grad), ("grad_w", w2.grad, w1.grad),
                           ("grad_b", b2.grad, b1.grad)]:
            err = ((u.float() - v.float()).abs().max() / v.float().abs().max()).item()
            check(f"bitlinear_triton {dtype} {name}", err <= tol, f"max rel err {err:.2e}")

    print("selfcheck:", "all ok" if fails == 0 else f"{fails} failures")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
