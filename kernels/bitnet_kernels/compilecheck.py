"""Compile every Triton kernel (and every autotune configuration) for an NVIDIA target, no GPU
needed: Triton's own ``ptxas`` turns them into cubins, which catches code-generation errors that
the CPU interpreter cannot see, and reports what the tensor-core path uses.

    python -m bitnet_train.kernels.compilecheck [--arch 90] [--quick]

Run it without ``TRITON_INTERPRET=1`` (the interpreter replaces the kernels). Prints one line per
kernel variant (shared memory, the mma instruction used) and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import os
import re
import sys


def _variants(quick: bool):
    from bitnet_train.kernels import matmul, quantize

    gemv_cfgs = [(c.kwargs, c.num_warps, c.num_stages) for c in matmul._gemv_configs()]
    mm_cfgs = [(c.kwargs, c.num_warps, c.num_stages) for c in matmul._mm_configs()]
    norms = [(0, 0, "*fp32"), (1, 0, "*bf16"), (1, 1, "*bf16"), (2, 2, "*fp16")]
    if quick:
        gemv_cfgs, mm_cfgs, norms = gemv_cfgs[:1], mm_cfgs[:1], norms[2:3]
    for quant_x in (True, False):
        for meta, warps, stages in gemv_cfgs:
            consts = dict(HAS_BIAS=True, QUANT_X=quant_x, USE_LIBDEVICE=True, BM=16, **meta)
            types = dict(XQ="*bf16" if quant_x else "*i8", A="*fp32", WB="*u8", S="*fp32", BIAS="*bf16", Y="*bf16",
                         WS="*i32", LOCK="*i32")
            yield f"gemv quant_x={quant_x} {meta} w{warps}s{stages}", matmul._ternary_gemv_kernel, types, consts, warps, stages
    for packed in (True, False):
        for meta, warps, stages in mm_cfgs:
            if not packed and meta["X_SPLIT"]:
                continue
            consts = dict(PACKED=packed, HAS_BIAS=False, **meta)
            types = dict(XQ="*i8", A="*fp32", WB="*u8" if packed else "*i8", S="*fp32", BIAS="*fp32", Y="*bf16")
            yield f"mm packed={packed} {meta} w{warps}s{stages}", matmul._ternary_mm_kernel, types, consts, warps, stages
    for dx, dy, xt in norms:
        consts = dict(HAS_RSTD=False, DT_X=dx, DT_Y=dy, BLOCK=4096, USE_LIBDEVICE=True)
        types = dict(X=xt, W="*fp32", Q="*i8", A="*fp32", R="*fp32", KF="fp32", eps="fp32")
        yield f"rmsnorm_act_quant DT_X={dx} DT_Y={dy}", quantize._rmsnorm_act_quant_kernel, types, consts, 4, 3
    yield "act_quant", quantize._act_quant_kernel, dict(X="*bf16", Q="*i8", A="*fp32"), dict(BLOCK=4096, USE_LIBDEVICE=True), 4, 3
    yield "weight_codes", quantize._weight_codes_kernel, dict(W="*bf16", S="*fp32", Q="*i8"), dict(BLOCK=4096, USE_LIBDEVICE=True), 4, 3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200, 80 = A100)")
    p.add_argument("--quick", action="store_true", help="one configuration per kernel and path (for the tests)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compilecheck: unset TRITON_INTERPRET (the interpreter replaces compiled kernels)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    fails = 0
    for name, kernel, types, consts, warps, stages in _variants(args.quick):
        sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in kernel.arg_names}
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts), target=target,
                                      options={"num_warps": warps, "num_stages": stages})
        except Exception as e:  # report every failing variant, not just the first
            fails += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}")
            continue
        mma = sorted(set(re.findall(r"(wgmma\.mma_async\.\S+?|mma\.sync\.\S+?)[ ;]", compiled.asm["ptx"])))
        print(f"ok   {name}: shared {compiled.metadata.shared} B, mma {', '.join(mma) or '-'}")
    print("compilecheck:", "all ok" if not fails else f"{fails} failures", f"(sm_{args.arch})")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
