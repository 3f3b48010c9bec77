"""Benchmark of the Triton kernels against bf16 cuBLAS (a script, not a test).

    python -m bitnet_train.kernels.bench          # or: bitnet-train bench kernels

Needs a CUDA GPU. One table, medians of ``triton.testing.do_bench`` (which also flushes L2
before every repetition); inputs and weights rotate through enough buffers to exceed the L2
cache, so no call finds its operands cached by the previous one.

Inference matmul, for each 2B4T projection shape ``out x in`` and token count ``M``:
   ``ternary_matmul(x, packed, s)`` (activation quantization + int8 x 2-bit ternary matmul)
   against ``F.linear`` in bf16. Path: ``gemvq`` = GEMV kernel quantizing x itself
   (``M <= GEMV_FUSED_QUANT_MAX_M``), ``gemv`` = quantization kernel + GEMV (``M <= GEMV_MAX_M``),
   ``tiled`` = quantization kernel + tiled kernel.
   Besides the times and the speedup (bf16 / ternary), the achieved memory bandwidth (decode,
   ``M <= 16``: weight, activation and output bytes over time) or int8 TOPS (prefill) as a
   fraction of the GPU's nominal dense peak, for H100 / H200 (``n/a`` on other GPUs).
The training step of one layer (these kernels inside BitLinear, against ``nn.Linear``, torch's int8
matmul and other libraries): ``scripts/bench_train_step.py``.

The first call of each shape autotunes the kernels (a few seconds per shape);
``BITNET_TRAIN_AUTOTUNE=0`` uses one fixed configuration instead.
"""

from __future__ import annotations

import argparse
import sys

# nominal dense peaks from NVIDIA's datasheets: (HBM bytes/s, int8 ops/s, bf16 flop/s)
_PEAKS = [
    ("H200", (4.8e12, 1979e12, 989e12)),
    ("H100 PCIe", (2.0e12, 1513e12, 756e12)),
    ("H100 NVL", (3.9e12, 1671e12, 835e12)),
    ("H100", (3.35e12, 1979e12, 989e12)),  # SXM5 (HBM3)
]


def peaks_for(device_name: str):
    """(bandwidth, int8 ops, bf16 flops) peaks for a device name, or None when unknown."""
    for key, peaks in _PEAKS:
        if key.lower() in device_name.lower():
            return peaks
    return None


def _parse_list(text: str, what: str, conv):
    try:
        vals = [conv(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals:
        from bitnet_train.errors import UserError

        raise UserError(f"--{what}: expected a comma-separated list, got {text!r}")
    return vals


def _shape(v: str):
    n, k = v.lower().split("x")
    n, k = int(n), int(k)
    if n <= 0 or k <= 0:
        raise ValueError(v)
    return n, k


def _fmt_pct(v):
    return "n/a" if v is None else f"{100 * v:.0f}%"


def run(args) -> int:
    from bitnet_train.errors import UserError

    tokens = _parse_list(args.tokens, "tokens", int)
    shapes = _parse_list(args.shapes, "shapes", _shape)
    import torch

    if not torch.cuda.is_available():
        raise UserError("bench kernels needs a CUDA GPU (torch.cuda.is_available() is False)")
    try:
        import triton.testing  # noqa: F401
    except ImportError as e:
        raise UserError(f"bench kernels needs Triton: {e}") from e
    _matmul_table(args, tokens, shapes)
    return 0


def _rotation(make, bytes_each: int, l2_bytes: int, max_buffers: int = 64):
    """Enough copies (from ``make(i)``) that cycling through them exceeds L2 three times."""
    n = min(max(2, -(-3 * l2_bytes // max(bytes_each, 1))), max_buffers)
    return [make(i) for i in range(n)]


def _cycle(items):
    state = [0]

    def nxt():
        state[0] = (state[0] + 1) % len(items)
        return items[state[0]]

    return nxt


def _do_bench(args, **kw):
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median", **kw)


def _matmul_table(args, tokens, shapes, device="cuda", timer=None) -> None:
    """``timer(fn) -> ms`` defaults to do_bench; the tests pass another to run this on the CPU."""
    import torch
    import torch.nn.functional as F

    from bitnet_train import quant
    from bitnet_train.kernels import matmul as ops, pack_ternary, ternary_matmul

    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        name, l2 = props.name, getattr(props, "L2_cache_size", 50 * 2**20)
    else:
        name, l2 = str(dev), 2**16
    peaks = peaks_for(name)
    torch.manual_seed(0)
    bench = timer or _do_bench(args)

    print(f"device: {name}; peaks (bandwidth, int8, bf16): "
          + ("n/a (unknown GPU)" if peaks is None else f"{peaks[0] / 1e12:.2f} TB/s, {peaks[1] / 1e12:.0f} TOPS, {peaks[2] / 1e12:.0f} TFLOPS"))
    print(f"autotune: {'on' if ops._autotune_enabled() else 'off'}; GEMV path for M <= {ops.GEMV_MAX_M}")
    print()
    print("inference matmul (median ms; speedup = bf16 / ternary; %peak: bandwidth for M <= 16, int8 TOPS above)")
    hdr = (f"{'out x in':>11} {'M':>5} {'path':>5} {'bf16 ms':>9} {'ternary ms':>10} {'speedup':>8} "
           f"{'tern GB/s|TOPS':>14} {'tern %peak':>10} {'bf16 %peak':>10} {'check':>6}")
    print(hdr)
    print("-" * len(hdr))
    for n, k in shapes:
        # rotate enough weights that even the 2-bit copies exceed L2 (the bf16 ones then do too)
        ws = _rotation(lambda i: torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02, n * ((k + 3) // 4), l2)
        packs = []
        for w in ws:
            codes, s = quant.weight_quant(w)
            packs.append((pack_ternary(codes), s))
        for m in tokens:
            xs = _rotation(lambda i: torch.randn(m, k, device=dev, dtype=torch.bfloat16), m * k * 2, l2, 8)
            nx, nw, np_ = _cycle(xs), _cycle(ws), _cycle(packs)
            # correctness of what is timed (against the reference fake-quant linear)
            p0, s0 = packs[0]
            y = ternary_matmul(xs[0], p0, s0)
            ref = quant.bitlinear_reference(xs[0].float(), ws[0].float())
            err = ((y.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
            ok = "ok" if err <= 1e-2 else f"{err:.0e}"

            def run_bf16():
                F.linear(nx(), nw())

            def run_tern():
                p, s = np_()
                ternary_matmul(nx(), p, s)

            t_bf16 = bench(run_bf16)
            t_tern = bench(run_tern)
            gemv = m <= ops.GEMV_MAX_M
            path = "gemvq" if m <= ops.GEMV_FUSED_QUANT_MAX_M else "gemv" if gemv else "tiled"
            if gemv:
                tern_bytes = n * ((k + 3) // 4) + m * k * 2 + m * n * 2  # packed weights, x, y (useful bytes)
                bf16_bytes = n * k * 2 + m * k * 2 + m * n * 2
                achieved = tern_bytes / (t_tern * 1e-3)
                shown = f"{achieved / 1e9:.0f} GB/s"
                tern_frac = achieved / peaks[0] if peaks else None
                bf16_frac = bf16_bytes / (t_bf16 * 1e-3) / peaks[0] if peaks else None
            else:
                ops_count = 2.0 * m * n * k
                achieved = ops_count / (t_tern * 1e-3)
                shown = f"{achieved / 1e12:.0f} TOPS"
                tern_frac = achieved / peaks[1] if peaks else None
                bf16_frac = ops_count / (t_bf16 * 1e-3) / peaks[2] if peaks else None
            print(f"{n:>5}x{k:<5} {m:>5} {path:>5} {t_bf16:>9.4f} {t_tern:>10.4f} "
                  f"{t_bf16 / t_tern:>7.2f}x {shown:>14} {_fmt_pct(tern_frac):>10} {_fmt_pct(bf16_frac):>10} {ok:>6}")
            sys.stdout.flush()
    print()


def main(argv=None) -> int:
    from bitnet_train.kernel_bench_args import add_kernels_arguments

    p = argparse.ArgumentParser(prog="python -m bitnet_train.kernels.bench", description=__doc__.splitlines()[0])
    add_kernels_arguments(p)
    args = p.parse_args(argv)
    from bitnet_train.errors import UserError

    try:
        return run(args)
    except UserError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
