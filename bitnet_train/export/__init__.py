"""``bitnet-train export``: a checkpoint to a packed model a real runtime loads, verified.

Formats: ``hf`` (transformers' packed BitNet layout, :mod:`.hf`) and ``gguf``: for SiLU models
``--quant tq2_0|tq1_0|f16|f32`` (llama.cpp's ``bitnet`` graph) or ``i2_s`` (bitnet.cpp), both in
:mod:`.gguf`; for ReLU² models (2B4T's block) ``--quant iq2_bn|iq2_bn_r4|iq1_bn|f16|f32`` for
ik_llama.cpp's ``bitnet-25`` graph (:mod:`.ik`). Without ``--quant`` the best format whose runtime
computes the model is chosen (:func:`choose_quant`).
The file is written under a temporary name, loaded in its runtime and compared with our model on
a probe text (:mod:`.verify`), and only then renamed to ``--out``: a failed or interrupted export
leaves nothing at ``--out`` (a ``.NAME.tmp-*`` leftover is removed by the next export to it).
"""

from __future__ import annotations


import time
from pathlib import Path

from .source import CheckpointSource, ExportError

GGUF_QUANTS = ("tq2_0", "tq1_0", "f16", "f32", "i2_s", "iq2_bn", "iq2_bn_r4", "iq1_bn")
RUNTIMES = ("llama.cpp", "ik_llama.cpp")


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to a packed inference format (hf, gguf), verified in its runtime",
        description=(
            "Convert a checkpoint into a packed model and verify it: the result is loaded in its runtime "
            "(stock transformers for hf, llama.cpp via llama-cpp-python for gguf, a bitnet.cpp build for "
            "gguf i2_s), run on a probe text "
            "together with our model, and the export fails when the logits disagree beyond the format's "
            "tolerance. The output appears at --out only after it passed."
        ),
    )
    p.add_argument("checkpoint", help="checkpoint directory (bitnet-train pretrain/init output)")
    p.add_argument("--format", required=True, choices=("hf", "gguf"))
    p.add_argument(
        "--quant", choices=GGUF_QUANTS,
        help="GGUF weight format: tq2_0/tq1_0 (llama.cpp, SiLU models), i2_s (bitnet.cpp, see --bitnet-cpp), "
        "iq2_bn/iq2_bn_r4/iq1_bn (ik_llama.cpp, ReLU² models), f16/f32 (the runtime that computes the model); "
        "default: the best one for the model, printed with the reason. Not used by hf",
    )
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help="for --quant f16/f32: whose graph the GGUF targets (default: llama.cpp for SiLU models, "
        "ik_llama.cpp for ReLU² ones)",
    )
    p.add_argument(
        "--i2s-layout",
        choices=("x86", "arm"),
        default="x86",
        help="I2_S block layout: x86 (blocks of 128: bitnet.cpp on x86, and every build before its 2025 "
        "ARM kernels; the one verified here) or arm (blocks of 64: today's bitnet.cpp on ARM)",
    )
    p.add_argument(
        "--bitnet-cpp",
        metavar="DIR",
        help="a built bitnet.cpp checkout to verify an i2_s export in (default: $BITNET_CPP_DIR)",
    )
    p.add_argument("--out", required=True, help="output file (gguf) or directory (hf)")
    p.add_argument("--tokenizer", help="tokenizer directory or name when the checkpoint holds none")
    p.add_argument(
        "--force",
        action="store_true",
        help="write a GGUF although its runtime's graph computes something else for this model "
        "(e.g. a ReLU² FFN in llama.cpp); the file is kept even when verification then fails",
    )
    p.add_argument(
        "--tq-fallback",
        choices=("f16", "f32"),
        help="store ternary tensors whose rows TQ/I2_S cannot pack (not multiples of 256, or of I2_S's block) "
        "as F16/F32 codes instead of failing",
    )
    p.add_argument("--no-verify", action="store_true", help="skip loading the result in its runtime")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--probe-text", help="text to compare logits on (default: a built-in paragraph)")
    p.add_argument("--probe-file", help="file whose start is the probe text")
    p.add_argument("--probe-tokens", type=int, default=128, help="probe length in tokens (default 128)")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object on stdout (the report lines go to stderr): path, "
                   "format, quant, runtime, ok and the verification figures (logit error, top-1, probe perplexity "
                   "ours and runtime's)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    import json
    import sys

    probe = args.probe_text
    if args.probe_file:
        try:
            probe = Path(args.probe_file).read_text(encoding="utf-8")[:20000]
        except (OSError, UnicodeDecodeError) as e:
            raise ExportError(f"--probe-file {args.probe_file}: {e}") from None
    result = export(
        args.checkpoint,
        fmt=args.format,
        out=args.out,
        quant=args.quant,
        tokenizer=args.tokenizer,
        force=args.force,
        tq_fallback=args.tq_fallback,
        verify=not args.no_verify,
        probe_text=probe,
        probe_tokens=args.probe_tokens,
        i2s_layout=args.i2s_layout,
        bitnet_cpp=args.bitnet_cpp,
        progress=not args.no_progress,
        runtime=args.runtime,
        log=(lambda *a: print(*a, file=sys.stderr)) if args.json else print,
    )
    if args.json:
        ag = result["agreement"]
        out = {k: v for k, v in result.items() if k != "agreement"}
        print(json.dumps({**out, "verified": ag is not None, "agreement": ag.as_dict() if ag is not None else None},
                         default=str))
    return 0 if result["ok"] else 1


def export(
    checkpoint,
    fmt: str,
    out,
    quant: str | None = None,
    tokenizer: str | None = None,
    force: bool = False,
    tq_fallback: str | None = None,
    verify: bool = True,
    probe_text: str | None = None,
    probe_tokens: int = 128,
    log=print,
    i2s_layout: str = "x86",
    bitnet_cpp: str | None = None,
    progress: bool = False,
    runtime: str | None = None,
) -> dict:
    """Export ``checkpoint`` to ``out``; returns ``{"ok", "path", "agreement", ...}``.

    Raises :class:`ExportError` for an export that cannot be made or that fails verification
    (then nothing is left at ``out``); with ``force`` a mismatched GGUF is kept and ``ok`` is
    False."""
    from ..fsutil import owned

    with owned(out, "export", inside=False):  # a second export to the same --out is refused
        return _export(checkpoint, fmt, Path(out), quant, tokenizer, force, tq_fallback, verify, probe_text,
                       probe_tokens, log, i2s_layout, bitnet_cpp, progress, runtime)


def _export(checkpoint, fmt, out, quant, tokenizer, force, tq_fallback, verify, probe_text, probe_tokens, log,
            i2s_layout, bitnet_cpp, progress, runtime) -> dict:
    from ..fsutil import atomic_dir, atomic_path
    from .source import load_tokenizer_for
    from .verify import DEFAULT_PROBE

    t0 = time.perf_counter()
    src = CheckpointSource(checkpoint)
    tok = load_tokenizer_for(src, tokenizer)
    _clean_leftovers(out)
    result: dict = {"path": str(out), "format": fmt, "ok": True, "agreement": None}
    if fmt == "hf":
        result["runtime"] = "transformers"
    text = probe_text or DEFAULT_PROBE

    if fmt == "hf":
        if quant is not None:
            raise ExportError("--quant applies to --format gguf only (hf stores 2-bit packed weights)")
        from .hf import write_hf

        with atomic_dir(out) as tmp, _Bar(progress, "export hf") as bar:
            result.update(write_hf(src, tmp, tok, progress=bar))
            log(f"wrote {fmt} to temporary {tmp.name} in {time.perf_counter() - t0:.1f} s")
            if verify:
                result["agreement"] = _verify(src, tok, text, probe_tokens, fmt, tmp, log)
                if not result["agreement"].ok:
                    raise ExportError(f"verification failed, nothing written to {out}: {result['agreement']}")
        log(f"exported {checkpoint} -> {out} ({_size(out)})")
        return result

    if fmt != "gguf":
        raise ExportError(f"--format {fmt!r}: choose hf or gguf")
    if quant is not None and quant not in GGUF_QUANTS:
        raise ExportError(f"--quant {quant!r}: GGUF formats are {', '.join(GGUF_QUANTS)}")
    if runtime is not None and runtime not in RUNTIMES:
        raise ExportError(f"--runtime {runtime!r}: choose {' or '.join(RUNTIMES)}")
    if quant is None:
        if runtime is not None:
            raise ExportError("--runtime applies to --quant f16/f32 (give --quant)")
        quant, why = choose_quant(src)
        log(f"format: gguf/{quant} ({why})")
    from . import ik

    target = _target(src, quant, runtime)
    result["runtime"], result["quant"] = target, quant
    if tq_fallback and not (quant.startswith("tq") or quant == "i2_s"):
        raise ExportError("--tq-fallback applies to --quant tq2_0/tq1_0/i2_s only")
    if target == "ik_llama.cpp":
        mismatches = ik.mismatches(src)
        if mismatches and not force:
            raise ExportError(
                "ik_llama.cpp's bitnet-25 graph would run this model wrong: " + "; ".join(mismatches)
                + ". Pass --force to write the file anyway"
            )
        problems = ik.shape_problems(src, quant)
        if problems:
            more = f"; and {len(problems) - 3} more tensors" if len(problems) > 3 else ""
            raise ExportError(f"ik_llama.cpp cannot run this model as {quant.upper()}, nothing written: "
                              + "; ".join(problems[:3]) + more + _shape_hint(src, quant))
    else:
        from .gguf import llama_cpp_mismatches

        mismatches = llama_cpp_mismatches(src)
        if mismatches and not force:
            hint = ""
            if src.hidden_act == "relu2":
                hint = (" ReLU² models (2B4T's block) run in ik_llama.cpp: --quant iq2_bn, iq2_bn_r4, iq1_bn, f16 "
                        "or f32 (or no --quant: the best one is chosen)")
            raise ExportError(
                f"{target}'s bitnet graph would run this model wrong (finite but wrong logits): "
                + "; ".join(mismatches)
                + "." + hint + ". The *-silu presets (SiLU FFN, tied embeddings) are the ones llama.cpp runs; "
                "pass --force to write the file anyway"
            )
    for m in mismatches:
        log(f"warning (--force): {m}")
    from .gguf import write_gguf

    with atomic_path(out) as tmp:
        with _Bar(progress, f"export gguf/{quant}") as bar:
            if target == "ik_llama.cpp":
                result.update(ik.write_ik(src, tmp, quant, tok, force=force, progress=bar))
            else:
                result.update(write_gguf(src, tmp, quant, tok, tq_fallback=tq_fallback, force=force,
                                         i2s_layout=i2s_layout, progress=bar))
        log(f"wrote gguf/{quant} to temporary {tmp.name} in {time.perf_counter() - t0:.1f} s ({_size(tmp)})")
        if quant == "i2_s":
            other = "arm" if i2s_layout == "x86" else "x86"
            log(f"I2_S layout {i2s_layout}: runs in bitnet.cpp builds for {i2s_layout}; for {other} builds "
                f"export with --i2s-layout {other}")
        if verify:
            fmt_key = f"ik_{quant}" if target == "ik_llama.cpp" and quant in ("f16", "f32") else quant
            ag = _verify(src, tok, text, probe_tokens, fmt_key, tmp, log, bitnet_cpp=bitnet_cpp,
                         i2s_layout=i2s_layout)
            result["agreement"] = ag
            if ag is not None and not ag.ok:
                if not force:
                    raise ExportError(f"verification failed, nothing written to {out}: {ag}")
                result["ok"] = False
                log(f"warning: kept {out} although verification failed (--force)")
    log(f"exported {checkpoint} -> {out} ({_size(out)})")
    return result


def _verify(src, tok, text, probe_tokens, fmt, path, log, bitnet_cpp=None, i2s_layout="x86"):
    import platform

    from . import verify as V

    ids = V.probe_ids(tok, text, probe_tokens)
    if fmt in V.IK_FORMATS:
        from . import ik

        if not ik.available():
            log(f"verify: {ik.WHEEL} is not installed; the GGUF was NOT checked in ik_llama.cpp "
                "(pip install 'bitnet-train[ik]')")
            return None
        theirs, tokenization = ik.ik_logits(path, ids, text=text[:2000], tokenizer=tok)
    elif fmt == "hf":
        theirs, tokenization = V.hf_logits(path, ids), "same tokenizer files"
    elif fmt == "i2_s":
        root = V.bitnet_cpp_dir(bitnet_cpp)
        if root is None:
            log("verify: no bitnet.cpp build given (--bitnet-cpp DIR or BITNET_CPP_DIR); the I2_S file was NOT "
                "checked in bitnet.cpp (llama.cpp cannot load I2_S)")
            return None
        host = "arm" if platform.machine().lower() in ("arm64", "aarch64") else "x86"
        if i2s_layout != host:
            log(f"verify: the {i2s_layout} I2_S layout cannot be run on this {host} machine; the file was NOT "
                "checked in bitnet.cpp")
            return None
        try:
            theirs, tokenization = V.bitnet_cpp_logits(root, path, ids, text=text[:2000], tokenizer=tok)
        except (OSError, RuntimeError) as e:
            raise ExportError(f"verify: {e}") from None
    else:
        if not V.llama_available():
            log("verify: llama-cpp-python is not installed; the GGUF was NOT checked in llama.cpp "
                "(pip install 'bitnet-train[llama]')")
            return None
        theirs, tokenization = V.gguf_logits(path, ids, text=text[:2000], tokenizer=tok)
    ours = V.our_logits(src.path, ids)
    emulated = None
    if V.TOLERANCES[fmt][2] is not None:
        emulated = V.our_logits(src.path, ids, emulate=fmt.removeprefix("ik_"))
    ag = V.compare(fmt, theirs, ours, tokenization, ours_emulated=emulated, ids=ids)
    log(str(ag))
    return ag


def _target(src, quant: str, runtime: str | None) -> str:
    """The runtime a GGUF of ``quant`` is for: ik's types are ik_llama.cpp's, TQ llama.cpp's, I2_S
    bitnet.cpp's; F16/F32 go to the runtime whose graph is the model's (``runtime`` overrides)."""
    from . import ik

    if quant in ik.IK_TYPES:
        want = "ik_llama.cpp"
    elif quant == "i2_s":
        want = "bitnet.cpp"
    elif quant.startswith("tq"):
        want = "llama.cpp"
    else:
        return runtime or ("ik_llama.cpp" if src.hidden_act == "relu2" else "llama.cpp")
    if runtime is not None and runtime != want:
        raise ExportError(f"--quant {quant} is {want}'s format; --runtime {runtime} applies to f16/f32 only")
    return want


def choose_quant(src) -> tuple[str, str]:
    """The best GGUF format whose runtime computes this model, and why (the words printed).

    SiLU: TQ2_0 in llama.cpp (the default before ReLU² export existed), F16 when the rows are not
    multiples of TQ's 256. ReLU²: ik_llama.cpp's IQ2_BN; IQ2_BN_R4 (the same 2 bits per weight, 4 rows
    interleaved) where rows under 512 values rule IQ2_BN out (the tiny preset's 256: measured to run
    and verify there, docs/runtimes.md), F16 where neither packs. Speeds: docs/runtimes.md."""
    from . import ik
    from .gguf import TQ_BLOCK

    rows = {src.shape(k)[-1] for k in src.keys() if src.is_ternary(k)}
    if src.hidden_act != "relu2":
        if all(r % TQ_BLOCK == 0 for r in rows):
            return "tq2_0", "SiLU FFN: llama.cpp's bitnet graph, 2-bit ternary TQ2_0"
        return "f16", (f"SiLU FFN: llama.cpp's bitnet graph; rows of {sorted(r for r in rows if r % TQ_BLOCK)} values "
                       f"are not multiples of TQ's {TQ_BLOCK}, so F16")
    if not ik.shape_problems(src, "iq2_bn"):
        return "iq2_bn", "ReLU² FFN: ik_llama.cpp's bitnet-25 graph, 2-bit ternary IQ2_BN"
    if not ik.shape_problems(src, "iq2_bn_r4"):
        return "iq2_bn_r4", (f"ReLU² FFN: ik_llama.cpp's bitnet-25 graph; rows of {min(rows)} values are under IQ2_BN's "
                             f"{ik.IK_MIN_ROW}, so its 4-row repack IQ2_BN_R4, which takes them")
    return "f16", "ReLU² FFN: ik_llama.cpp's bitnet-25 graph; no ternary type of ik packs these rows, so F16"


def _shape_hint(src, quant: str) -> str:
    from . import ik

    ok = [q for q in ("iq2_bn", "iq2_bn_r4", "iq1_bn") if q != quant and not ik.shape_problems(src, q)]
    return (". Formats that take this shape: " + ", ".join(ok + ["f16", "f32"])) if ok else (
        ". Export --quant f16 or f32, which take any shape")


class _Bar:
    """A tqdm bar over the tensors written (the writers call it with ``(done, total, name)``); a
    no-op when disabled."""

    def __init__(self, enabled: bool, desc: str):
        self.enabled, self.desc, self.bar = enabled, desc, None

    def __enter__(self):
        return self if self.enabled else None

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="tensor", dynamic_ncols=True)
        self.bar.set_postfix_str(name, refresh=False)
        self.bar.update(done - self.bar.n)  # redraws at most every 0.1 s

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


def _clean_leftovers(out: Path) -> None:
    """Tidy what a killed export to this same ``out`` left: a previous copy of an interrupted
    overwrite is restored, temporaries removed (only this target's: other writers' in the same
    directory, e.g. a running trainer's, are not touched)."""
    import shutil

    from ..fsutil import TMP_MARK, recover

    if not out.parent.is_dir():
        return
    recover(out)
    for p in out.parent.glob(f".{out.name}{TMP_MARK}*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _size(p: Path) -> str:
    p = Path(p)
    n = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return f"{n / 2**20:.1f} MiB"


__all__ = ["ExportError", "export", "register"]

