#!/usr/bin/env python3
"""One BitLinear training step (forward + backward of one layer), side by side in one process.

    python scripts/bench_train_step.py                        # CUDA: 2B4T shapes, M = 1, 16, 128, 2048
    python scripts/bench_train_step.py --device cpu --shapes small
    python scripts/bench_train_step.py --json out.json --modes bf16,autocast

For every weight shape ``out x in`` and token count ``M``, each implementation below runs the
same step on the same weights and inputs (``[1, M, in]``, upstream gradient ``[1, M, out]``):

  nn.Linear       ``torch.nn.Linear`` in the mode's dtypes: the baseline every ratio is taken against
  torch           ``BitLinear(backend="torch")`` (bitnet_train.layers.bitlinear_torch)
  triton          ``BitLinear(backend="triton")``, weight codes quantized in the step (the first
                  gradient-accumulation micro-batch, or every step without accumulation)
  triton-cached   the same with the weight codes cached (micro-batches 2..n of one step)
  int_mm          a minimal autograd function: ``quant.act_quant`` / ``quant.weight_quant``, the
                  forward ``quant.int_linear`` (``torch._int_mm``, int32 accumulation), a bf16
                  straight-through backward; CUDA's ``_int_mm`` needs M > 16 (n/a below)
  torchao         torchao's ``bitnet_training()`` applied with ``quantize_`` to an ``nn.Linear``
                  (int8 ``scaled_int8_mm`` forward, Triton on CUDA, ``torch._int_mm`` on the CPU)
  onebitllms      onebitllms' ``BitNetLinear`` (Triton fake-quantizers, bf16 ``F.linear``; CUDA only)

A peer that is not importable prints ``not installed``; one that cannot run on the device prints
``needs CUDA``; an error prints ``error: ...`` and the table goes on. Modes: ``bf16`` (bf16
weights and inputs, no autocast), ``autocast`` (fp32 weights and inputs under bf16 autocast, as
``bitnet-train pretrain`` trains on a GPU) and ``fp32`` (fp32, no autocast, as it trains on a CPU:
``--device cpu --shapes 2b4t --tokens 512 --modes fp32`` is the CPU table of docs/performance.md).

Figures per row: median ms of the step (CUDA: ``triton.testing.do_bench``, which flushes L2
before every repetition, with the layer rotated through enough copies that its weight does not
stay in L2; CPU: ``bench_harness.alternated_medians``, every implementation of the row once a round
in turn, ``--reps`` rounds after ``--warmup-reps``, so that the machine's load reaches all alike), ``x lin``
= time / the ``nn.Linear`` time of the same shape and M (below 1.00x is faster than it),
TFLOP/s at 6·M·out·in per step, and ``rel.err`` = ‖y − ref‖ / ‖ref‖ of the forward output against
``quant.bitlinear_reference`` in fp32 on the same operands (``-`` for nn.Linear). The first call of
a Triton kernel at a new shape compiles and autotunes it: that happens in the warm-up.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from pathlib import Path

from bench_harness import alternated_medians, machine, machine_line, versions, write_json

IMPLS = ("nn.Linear", "torch", "triton", "triton-cached", "int_mm", "torchao", "onebitllms")
SMALL_SHAPES = [(96, 128), (64, 256)]
SMALL_TOKENS = [1, 16, 64]
MODES = {
    "bf16": "bf16 weights and inputs, no autocast",
    "autocast": "fp32 weights and inputs under bf16 autocast (as pretrain trains on a GPU)",
    "fp32": "fp32 weights and inputs, no autocast (as pretrain trains on a CPU)",
}


def _parse_shapes(text: str):
    from bitnet_train.kernel_bench_args import SHAPES

    if text == "2b4t":
        return list(SHAPES)
    if text == "small":
        return list(SMALL_SHAPES)
    out = []
    for v in text.split(","):
        try:
            n, k = (int(p) for p in v.lower().split("x"))
        except ValueError:
            raise SystemExit(f"bench_train_step: --shapes: expected 2b4t, small or OUTxIN,..., got {v!r}") from None
        if n <= 0 or k <= 0:
            raise SystemExit(f"bench_train_step: --shapes: {v!r} must be positive")
        out.append((n, k))
    return out


def _parse_ints(text: str, what: str):
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) <= 0:
        raise SystemExit(f"bench_train_step: --{what}: expected positive integers, comma-separated, got {text!r}")
    return vals


# ----------------------------------------------------------------------------- the implementations


class _IntMMFn:
    """The minimal int8-forward autograd function of the ``int_mm`` row (built lazily: torch)."""

    fn = None

    @classmethod
    def get(cls):
        if cls.fn is None:
            import torch

            from bitnet_train import quant

            class Fn(torch.autograd.Function):
                @staticmethod
                def forward(ctx, x, w):
                    xq, a = quant.act_quant(x)
                    wq, s = quant.weight_quant(w)
                    dev = x.device.type
                    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
                    ctx.save_for_backward(xq, a, wq, s)
                    ctx.dtypes = (x.dtype, w.dtype)
                    return quant.int_linear(xq, a, wq, s, out_dtype=cdt)

                @staticmethod
                def backward(ctx, g):
                    xq, a, wq, s = ctx.saved_tensors
                    x_dtype, w_dtype = ctx.dtypes
                    k, n = xq.shape[-1], wq.shape[0]
                    g2 = g.reshape(-1, n)
                    grad_x = (g2 @ quant.weight_dequant(wq, s, g2.dtype)).reshape(xq.shape).to(x_dtype)
                    x_dq = quant.act_dequant(xq.reshape(-1, k), a.reshape(-1, 1), g2.dtype)
                    grad_w = (g2.t() @ x_dq).to(w_dtype)
                    return grad_x, grad_w

            cls.fn = Fn
        return cls.fn


def _int_mm_module(lin):
    import torch.nn as nn

    class IntMM(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(lin.weight.detach().clone())

        def forward(self, x):
            return _IntMMFn.get().apply(x, self.weight)

    return IntMM()


def _missing(e: ImportError, top: str) -> str | None:
    """'not installed' when ``top`` itself is absent; None when something else failed to import."""
    return "not installed" if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == top else None


def implementations(device, interpret: bool) -> dict:
    """name -> (factory(lin) -> module, None) or (None, status) for each of IMPLS."""
    from bitnet_train.layers.bitlinear import BitLinear

    out = {"nn.Linear": (lambda lin: copy.deepcopy(lin), None)}
    out["torch"] = (lambda lin: BitLinear.from_linear(lin, backend="torch"), None)
    if device.type != "cuda" and not interpret:
        out["triton"] = out["triton-cached"] = (None, "needs CUDA (or TRITON_INTERPRET=1)")
    else:
        try:
            import triton  # noqa: F401
        except ImportError:
            out["triton"] = out["triton-cached"] = (None, "not installed")
        else:
            out["triton"] = (lambda lin: _uncached(BitLinear.from_linear(lin, backend="triton")), None)
            out["triton-cached"] = (lambda lin: BitLinear.from_linear(lin, backend="triton"), None)
    out["int_mm"] = (_int_mm_module, None)

    try:
        from torchao import quantize_
        from torchao.prototype.quantized_training import bitnet_training
    except ImportError as e:
        out["torchao"] = (None, _missing(e, "torchao") or f"error: import: {e}")
    else:
        def make_torchao(lin):
            import torch.nn as nn

            m = nn.Sequential(copy.deepcopy(lin))
            quantize_(m, bitnet_training())
            return m

        out["torchao"] = (make_torchao, None)

    try:
        from onebitllms import BitNetLinear
    except ImportError as e:
        out["onebitllms"] = (None, _missing(e, "onebitllms") or f"error: import: {e}")
    else:
        if device.type != "cuda":
            out["onebitllms"] = (None, "needs CUDA")
        else:
            def make_onebit(lin):
                import torch.nn as nn

                m = BitNetLinear(lin.in_features, lin.out_features, bias=False)
                m.weight = nn.Parameter(lin.weight.detach().clone())
                return m

            out["onebitllms"] = (make_onebit, None)
    return out


def _uncached(layer):
    """A triton BitLinear whose forward quantizes the weight every call (no cached codes)."""
    fwd = layer.forward

    def forward(x):
        layer.clear_weight_cache()
        return fwd(x)

    layer.forward = forward
    return layer


# ----------------------------------------------------------------------------- timing


def _timer(device, args):
    """CUDA: ``triton.testing.do_bench`` of one implementation (the CPU's are timed together, alternated)."""
    if device.type != "cuda":
        return None
    import triton.testing

    def bench(fn, params):
        return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, grad_to_none=params, return_mode="median")

    return bench


def _step(layers, xs, g, device, autocast: bool):
    """One training step of the next layer copy on the next input (rotating), bound to this shape's operands."""
    import torch

    state = [0]

    def step():
        state[0] = (state[0] + 1) % (len(layers) * len(xs))
        layer, x = layers[state[0] % len(layers)], xs[state[0] % len(xs)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        y.backward(g)

    return step


def _zeroing(step, params):
    def call():
        for p in params:
            p.grad = None
        step()

    return call


def _copies(device, n: int, k: int) -> int:
    """Layer copies to rotate through so that one step's weight is not in L2 from the last one."""
    if device.type != "cuda":
        return 1
    import torch

    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return int(min(8, max(2, math.ceil(3 * l2 / (n * k * 2)))))


def _rel_err(y, ref) -> float:
    import torch

    y = y.detach().float().reshape(ref.shape)
    if not torch.isfinite(y).all():
        return float("nan")
    return ((y - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def run_mode(mode: str, shapes, tokens, device, args, impls, emit, rows: list) -> None:
    """Time every implementation at every shape and M in ``mode``; each row goes to ``rows`` and ``emit``."""
    import torch

    from bitnet_train import quant

    wdtype = torch.bfloat16 if mode == "bf16" else torch.float32  # fp32 and autocast: fp32 weights and inputs
    autocast = mode == "autocast"
    bench = _timer(device, args)
    for n, k in shapes:
        torch.manual_seed(0)
        base = torch.nn.Linear(k, n, bias=False, device=device, dtype=wdtype)
        copies = _copies(device, n, k)
        built = {}
        for name in IMPLS:
            make, status = impls[name]
            if make is None:
                built[name] = status
                continue
            try:
                built[name] = [make(base) for _ in range(copies)]
            except Exception as e:  # noqa: BLE001 - a peer that cannot be built is reported, not fatal
                built[name] = _error("build: ", e)
        for m in tokens:
            xs = [torch.randn(1, m, k, device=device, dtype=wdtype, requires_grad=True) for _ in range(2)]
            g = torch.randn(1, m, n, device=device, dtype=torch.bfloat16 if autocast else wdtype)
            with torch.no_grad():
                ref = quant.bitlinear_reference(xs[0].detach().float(), base.weight.float())
            shape_rows, timed = [], []
            for name in IMPLS:
                row = {"mode": mode, "out": n, "in": k, "M": m, "impl": name}
                shape_rows.append(row)
                layers = built[name]
                if name == "int_mm" and device.type == "cuda" and m <= 16:
                    layers = "n/a: torch._int_mm needs M > 16 on CUDA"
                if isinstance(layers, str):
                    row["status"] = layers
                    continue
                step = _step(layers, xs, g, device, autocast)
                params = [p for layer in layers for p in layer.parameters()] + xs
                try:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        y0 = layers[0](xs[0])
                    row["rel_err"] = None if name == "nn.Linear" else _rel_err(y0, ref)
                    if device.type == "cuda":
                        row["ms"] = bench(step, params)
                    else:
                        step()  # a step that fails is reported here, before the timed rounds
                        timed.append((row, _zeroing(step, params)))
                except Exception as e:  # noqa: BLE001 - one failing implementation must not stop the table
                    row.pop("rel_err", None)
                    row["status"] = _error("", e)
            if timed:  # the CPU: every implementation in turn, round after round, so load reaches all alike
                times = alternated_medians([f for _, f in timed], repeats=args.reps, warmup=args.warmup_reps)
                for (row, _), t in zip(timed, times):
                    row["ms"] = t * 1e3
            t_lin = next((r["ms"] for r in shape_rows if r["impl"] == "nn.Linear" and "ms" in r), None)
            for row in shape_rows:
                if "ms" in row:
                    ms = row["ms"]
                    row.update(vs_linear=(ms / t_lin) if t_lin else None, tflops=6.0 * m * n * k / (ms * 1e-3) / 1e12)
                rows.append(row)
                emit(row)
            del xs, g
        del built
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _error(prefix: str, e: Exception) -> str:
    """``error: [prefix: ]Type: first line of the message (at the innermost file:line)``."""
    import traceback

    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {'/'.join(Path(frames[-1].filename).parts[-2:])}:{frames[-1].lineno})" if frames else ""
    return f"error: {prefix}{type(e).__name__}: {msg}"[:200] + where


def _fmt_row(r: dict) -> str:
    head = f"{r['out']:>5}x{r['in']:<5} {r['M']:>5} {r['impl']:<14}"
    if "status" in r:
        return f"{head} {r['status']}"
    vs = "-" if r["vs_linear"] is None else f"{r['vs_linear']:.2f}x"
    err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
    return f"{head} {r['ms']:>10.4f} {vs:>8} {r['tflops']:>8.2f} {err:>8}"


def summary_table(rows) -> list[str]:
    """One line per (mode, shape, M): each implementation's time / nn.Linear (or its status)."""
    lines = [f"{'mode':<9}{'out x in':>11} {'M':>5} " + " ".join(f"{n:>13}" for n in IMPLS)]
    key = lambda r: (r["mode"], r["out"], r["in"], r["M"])  # noqa: E731
    groups = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["impl"]] = r
    for (mode, n, k, m), by in groups.items():
        cells = []
        for name in IMPLS:
            r = by.get(name)
            if r is None:
                cells.append("-")
            elif "status" in r:
                s = r["status"]
                cells.append("not inst." if s == "not installed" else "needs CUDA" if s.startswith("needs CUDA")
                             else "n/a" if s.startswith("n/a") else "error")
            elif name == "nn.Linear":
                cells.append(f"{r['ms']:.4f}ms")
            else:
                cells.append("-" if r["vs_linear"] is None else f"{r['vs_linear']:.2f}x")
        lines.append(f"{mode:<9}{n:>5}x{k:<5} {m:>5} " + " ".join(f"{c:>13}" for c in cells))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--shapes", default=None, help="2b4t (default on CUDA), small (default on the CPU) or OUTxIN,...")
    p.add_argument("--tokens", default=None, help="token counts M, comma-separated (default 1,16,128,2048; small: 1,16,64)")
    p.add_argument("--modes", default="bf16", help="bf16, autocast and/or fp32, comma-separated (default bf16)")
    p.add_argument("--warmup", type=int, default=10, help="CUDA: do_bench warm-up in ms (default 10)")
    p.add_argument("--rep", type=int, default=50, help="CUDA: do_bench measuring time in ms (default 50)")
    p.add_argument("--reps", type=int, default=5, help="CPU: timed rounds, each implementation once a round (default 5)")
    p.add_argument("--warmup-reps", type=int, default=1, help="CPU: untimed rounds first (default 1)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows (and versions) to this JSON file")
    args = p.parse_args(argv)

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_train_step: error: --device cuda but torch.cuda.is_available() is False (use --device cpu)",
              file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        print(f"bench_train_step: error: --device {args.device!r}: cuda or cpu", file=sys.stderr)
        return 2
    shapes = _parse_shapes(args.shapes or ("2b4t" if device.type == "cuda" else "small"))
    default_tokens = "1,16,128,2048" if (args.shapes or ("2b4t" if device.type == "cuda" else "small")) != "small" \
        else ",".join(map(str, SMALL_TOKENS))
    tokens = _parse_ints(args.tokens or default_tokens, "tokens")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        print(f"bench_train_step: error: --modes {args.modes!r}: one or more of {', '.join(MODES)}", file=sys.stderr)
        return 2
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda":
        # torchao's C++ extensions are built for CUDA; its BitNet training path needs none of them
        os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    ver = versions(("torch", "triton", "transformers", "torchao", "onebitllms"))
    print(machine_line() + ("; Triton in its CPU interpreter" if interpret and device.type == "cpu" else ""))
    impls = implementations(device, interpret)
    print("training step of one layer, forward + backward (median ms; x lin = time / nn.Linear; "
          "TFLOP/s at 6·M·out·in; rel.err of the forward against quant.bitlinear_reference)")
    rows = []
    result = {"device": name, "versions": ver, "machine": machine(), "rows": rows}

    def emit(r):
        print(_fmt_row(r), flush=True)
        write_json(args.json, result)  # after every row: a run stopped by a time limit keeps what it measured

    for mode in modes:
        print(f"\nmode {mode}: " + MODES[mode])
        print(f"{'out x in':>11} {'M':>5} {'impl':<14} {'ms':>10} {'x lin':>8} {'TFLOP/s':>8} {'rel.err':>8}")
        run_mode(mode, shapes, tokens, device, args, impls, emit, rows)
    print("\nsummary: time / nn.Linear per implementation (below 1.00x is faster than nn.Linear in the same mode)")
    for line in summary_table(rows):
        print(line)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
