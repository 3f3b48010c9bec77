"""``bitnet-train export``: a checkpoint to a packed model a real runtime loads, verified.

Formats: ``hf`` (transformers' packed BitNet layout, :mod:`.hf`) and ``gguf``: for SiLU models
``--quant tq2_0|tq1_0|q2_0|f16|f32`` (llama.cpp's ``bitnet`` graph) or ``i2_s`` (bitnet.cpp), for a
converted Llama-shaped model the same llama.cpp types in its ``llama`` graph, all in :mod:`.gguf`; for
ReLU² models (2B4T's block) ``--quant iq2_bn|iq2_bn_r4|iq1_bn|f16|f32`` for ik_llama.cpp's
``bitnet-25`` graph (:mod:`.ik`). Without ``--quant`` the best format whose runtime
computes the model is chosen (:func:`choose_quant`).
Each format is one record of :mod:`.formats` (its runtime, graph, rows, tolerance). The file is written
under a temporary name, loaded in its runtime and compared with our model on a probe text
(:mod:`.verify`), and only then renamed to ``--out``: a failed or interrupted export
leaves nothing at ``--out`` (a ``.NAME.tmp-*`` leftover is removed by the next export to it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bitnet_train.runtimes.llamacpp import has_ggml_type
from bitnet_train.export.formats import (CONVERTED_TYPES, EMBED_TYPES, FORMATS, GGUF_QUANTS, I2S_BLOCKS, TQ_BLOCK, Format,
                                         Graph, default_embed_type, embed_problems, find, graph_for, graph_mismatches)
from bitnet_train.errors import ExportError
from bitnet_train.export.source import CheckpointSource

RUNTIMES = ("llama.cpp", "ik_llama.cpp")  # --runtime: whose graph an F16/F32 GGUF targets


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
        help="GGUF weight format: tq2_0/tq1_0/q2_0 (llama.cpp: SiLU BitNet models, converted Llama-shaped ones), "
        "i2_s (bitnet.cpp, see --bitnet-cpp), "
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
    p.add_argument(
        "--embed-type", choices=tuple(EMBED_TYPES),
        help="GGUF: how token_embd is stored (with a tied head it is also the output matrix, read in full for "
        "every decoded token); q8_0 needs a hidden size that is a multiple of 32, q6_k of 256 (default: q8_0 "
        "for the ternary formats where it fits, else f16; f16/f32 for --quant f16/f32)",
    )
    p.add_argument("--output-type", choices=tuple(EMBED_TYPES),
                   help="GGUF: how an untied output.weight is stored (default: --embed-type's)")
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
        args.format,
        args.out,
        quant=args.quant,
        tokenizer=args.tokenizer,
        force=args.force,
        tq_fallback=args.tq_fallback,
        embed_type=args.embed_type,
        output_type=args.output_type,
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


@dataclass
class ExportOptions:
    """What ``bitnet-train export`` takes besides the checkpoint, the format and the output (the CLI's
    flags of the same names)."""

    quant: str | None = None  # GGUF: the format's --quant name; None: the best one (choose_quant)
    runtime: str | None = None  # for f16/f32: whose graph the GGUF targets
    tokenizer: str | None = None  # when the checkpoint holds none
    force: bool = False  # write although the runtime's graph computes something else; keep a failed file
    tq_fallback: str | None = None  # f16/f32 codes for rows TQ/I2_S cannot pack
    embed_type: str | None = None  # GGUF: token_embd's storage (formats.EMBED_TYPES); None: formats.default_embed_type
    output_type: str | None = None  # GGUF: an untied output.weight's storage; None: embed_type's
    verify: bool = True
    probe_text: str | None = None
    probe_tokens: int = 128
    i2s_layout: str = "x86"
    bitnet_cpp: str | None = None
    progress: bool = False


def export(checkpoint, fmt: str, out, log=print, **options) -> dict:
    """Export ``checkpoint`` to ``out`` in ``fmt`` (``hf`` or ``gguf``; ``options``: the fields of
    :class:`ExportOptions`); returns ``{"ok", "path", "agreement", ...}``.

    Choose the format, check that its runtime computes the model and its rows fit, write it under a
    temporary name, verify it in its runtime, rename it. Raises :class:`ExportError` for an export that
    cannot be made or that fails verification (then nothing is left at ``out``); with ``force`` a
    mismatched GGUF is kept and ``ok`` is False. A second export to the same ``out`` is refused while
    one runs."""
    from bitnet_train.fsutil import owned

    o = ExportOptions(**options)
    with owned(out, "export", inside=False):
        return _export(checkpoint, fmt, Path(out), o, log)


def _export(checkpoint, fmt_name: str, out: Path, o: ExportOptions, log) -> dict:
    from bitnet_train.fsutil import atomic_dir, atomic_path, clean_leftovers
    from bitnet_train.export.source import load_tokenizer_for
    from bitnet_train.export.verify import DEFAULT_PROBE, verify_export

    t0 = time.perf_counter()
    src = CheckpointSource(checkpoint)
    tok = load_tokenizer_for(src, o.tokenizer)
    clean_leftovers(out)
    fmt = _format(src, fmt_name, o, log)
    graph = graph_for(src, fmt.runtime, fmt.quant) if fmt.is_gguf else None
    mismatches = _check(src, fmt, graph, o)
    for m in mismatches:
        log(f"warning (--force): {m}")
    if graph is not None and o.embed_type is None:
        from dataclasses import replace

        embed, why = default_embed_type(src, fmt.quant)
        o = replace(o, embed_type=embed)
        log(f"token_embd: {embed} ({why}; --embed-type to choose)")
    result: dict = {"path": str(out), "format": fmt_name, "ok": True, "agreement": None, "runtime": fmt.runtime}
    name = fmt_name
    if graph is not None:
        result.update(quant=fmt.quant, arch=graph.arch)
        name = f"{fmt_name}/{fmt.quant}"
    with (atomic_path if fmt.is_gguf else atomic_dir)(out) as tmp:
        with _Bar(o.progress, f"export {name}") as bar:
            result.update(_write(src, fmt, graph, tmp, tok, o, bar))
        log(f"wrote {name} to temporary {tmp.name} in {time.perf_counter() - t0:.1f} s"
            + (f" ({_size(tmp)})" if fmt.is_gguf else ""))
        if fmt.quant == "i2_s":
            other = "arm" if o.i2s_layout == "x86" else "x86"
            log(f"I2_S layout {o.i2s_layout}: runs in bitnet.cpp builds for {o.i2s_layout}; for {other} builds "
                f"export with --i2s-layout {other}")
        if o.verify:
            ag = verify_export(src, tok, fmt, tmp, o.probe_text or DEFAULT_PROBE, o.probe_tokens, log,
                               bitnet_cpp=o.bitnet_cpp, i2s_layout=o.i2s_layout, embed_type=result.get("embed_type"),
                               output_type=result.get("output_type"))
            result["agreement"] = ag
            if ag is not None and not ag.ok:
                if not (o.force and fmt.is_gguf):
                    raise ExportError(f"verification failed, nothing written to {out}: {ag}")
                result["ok"] = False
                log(f"warning: kept {out} although verification failed (--force)")
    log(f"exported {checkpoint} -> {out} ({_size(out)})")
    return result


def _format(src, fmt_name: str, o: ExportOptions, log) -> Format:
    """The record to write: ``hf``, the asked GGUF quant in its runtime, or the best one for the model."""
    if fmt_name == "hf":
        if o.quant is not None:
            raise ExportError("--quant applies to --format gguf only (hf stores 2-bit packed weights)")
        return find("hf")
    if fmt_name != "gguf":
        raise ExportError(f"--format {fmt_name!r}: choose hf or gguf")
    if o.runtime is not None and o.runtime not in RUNTIMES:
        raise ExportError(f"--runtime {o.runtime!r}: choose {' or '.join(RUNTIMES)}")
    quant = o.quant
    if quant is None:
        if o.runtime is not None:
            raise ExportError("--runtime applies to --quant f16/f32 (give --quant)")
        quant, why = choose_quant(src)
        log(f"format: gguf/{quant} ({why})")
    if quant == "hf" or quant not in GGUF_QUANTS:
        raise ExportError(f"--quant {quant!r}: GGUF formats are {', '.join(GGUF_QUANTS)}")
    candidates = [f for f in FORMATS if f.quant == quant and f.is_gguf]
    if len(candidates) > 1 and o.runtime is None:  # f16/f32: the runtime whose graph is the model's
        return find(quant, _graph_runtime(src))
    return find(quant, o.runtime)


def _graph_runtime(src) -> str:
    """The runtime whose graph computes the model's FFN: ik_llama.cpp for ReLU², llama.cpp otherwise."""
    return "ik_llama.cpp" if src.hidden_act == "relu2" else "llama.cpp"


def _check(src, fmt: Format, graph: Graph | None, o: ExportOptions) -> list[str]:
    """Refuse, before anything is written, a model the format's runtime would compute wrong (unless
    ``force``: then the mismatches are returned, to be logged) or whose rows the format cannot pack."""
    if o.tq_fallback and not fmt.fallback:
        takes = "/".join(f.quant for f in FORMATS if f.fallback)
        raise ExportError(f"--tq-fallback applies to --quant {takes} only")
    if graph is None:
        if o.embed_type or o.output_type:
            raise ExportError("--embed-type/--output-type apply to --format gguf only")
        return []
    for flag, t in (("--embed-type", o.embed_type), ("--output-type", o.output_type)):
        if t is not None and t not in EMBED_TYPES:
            raise ExportError(f"{flag} {t!r}: choose one of {', '.join(EMBED_TYPES)}")
    problems = embed_problems(src, o.embed_type, "--embed-type") if o.embed_type else []
    if o.output_type and "lm_head.weight" in src.keys() and not src.head_is_embedding():
        problems += embed_problems(src, o.output_type, "--output-type", "lm_head.weight")
    if problems:
        raise ExportError("; ".join(problems) + "; nothing written")
    mismatches = graph_mismatches(src, graph, fmt.runtime)
    if mismatches and not o.force:
        raise ExportError(f"{fmt.runtime}'s {graph.arch} graph would run this model wrong (finite but wrong logits): "
                          + "; ".join(mismatches) + ". Pass --force to write the file anyway")
    block = I2S_BLOCKS[o.i2s_layout] if fmt.quant == "i2_s" else fmt.block
    problems = fmt.shape_problems(src, block)
    if problems and not (fmt.fallback and o.tq_fallback):
        more = f"; and {len(problems) - 3} more tensors" if len(problems) > 3 else ""
        raise ExportError(f"{fmt.runtime} cannot run this model as {fmt.quant.upper()}, nothing written: "
                          + "; ".join(problems[:3]) + more + _shape_hint(src, fmt, block))
    return mismatches


def _write(src, fmt: Format, graph: Graph | None, tmp: Path, tok, o: ExportOptions, bar) -> dict:
    """The writer of the format: transformers' packed layout, llama.cpp/bitnet.cpp's GGUF, or ik's."""
    if graph is None:
        from bitnet_train.export.hf import write_hf

        return write_hf(src, tmp, tok, progress=bar)
    if fmt.runtime == "ik_llama.cpp":
        from bitnet_train.export import ik

        return ik.write_ik(src, tmp, fmt.quant, tok, force=o.force, progress=bar, embed_type=o.embed_type,
                           output_type=o.output_type, graph=graph)
    from bitnet_train.export.gguf import write_gguf

    if fmt.quant == "q2_0" and not has_ggml_type("q2_0"):
        raise ExportError("--quant q2_0 needs a llama.cpp that has Q2_0: pip install 'llama-cpp-python>=0.3.36'")
    return {**write_gguf(src, tmp, fmt.quant, tok, tq_fallback=o.tq_fallback, force=o.force,
                         i2s_layout=o.i2s_layout, progress=bar, graph=graph, embed_type=o.embed_type,
                         output_type=o.output_type), "arch": graph.arch}


def choose_quant(src, ik_installed: bool | None = None) -> tuple[str, str]:
    """The best GGUF format whose runtime computes this model on a CPU, and why (the words printed).

    llama.cpp's TQ2_0 where every ternary row is a multiple of its 256 (SiLU BitNet in llama.cpp's bitnet
    graph, a converted Llama-shaped or Qwen2 model in its own graph); else ik_llama.cpp's IQ2_BN (rows of at
    least 512, multiples of 128), else its 4-row repack IQ2_BN_R4 (narrower rows: the tiny preset's 256); F16 where
    none packs. ReLU² models go to ik_llama.cpp only. Q2_0 (blocks of 64) is never the default: llama.cpp
    0.3.36 decodes it slower than F16 on an AVX2 CPU (measured 0.22x at the 2B4T shape, docs/runtimes.md);
    it is what is left for a SiLU or converted model when ik_llama.cpp is not installed (``ik_installed``,
    default: whether it imports)."""
    from bitnet_train.runtimes import ikllama

    rows = {src.shape(k)[-1] for k in src.keys() if src.is_ternary(k)}
    mt = src.config.get("model_type")
    if mt in CONVERTED_TYPES:
        what = f"a converted {mt} model"
        arch = graph_for(src, "llama.cpp", "tq2_0").arch
        where = {"llama.cpp": f"llama.cpp's {arch} graph", "ik_llama.cpp": f"ik_llama.cpp's {arch} graph"}
    elif src.hidden_act != "relu2":
        what = "SiLU FFN"
        where = {"llama.cpp": "llama.cpp's bitnet graph", "ik_llama.cpp": "ik_llama.cpp's bitnet graph"}
    else:
        what = "ReLU² FFN"
        where = {"ik_llama.cpp": "ik_llama.cpp's bitnet-25 graph"}
    if "llama.cpp" in where and not find("tq2_0").shape_problems(src):
        return "tq2_0", f"{what}: {where['llama.cpp']}, 2-bit ternary TQ2_0"
    odd = f"rows of {sorted(r for r in rows if r % TQ_BLOCK)} values are not multiples of TQ's {TQ_BLOCK}; " \
        if "llama.cpp" in where else ""
    ik_ok = ikllama.available() if ik_installed is None else ik_installed
    if "llama.cpp" not in where or ik_ok:
        if not find("iq2_bn").shape_problems(src):
            return "iq2_bn", f"{what}: {odd}{where['ik_llama.cpp']}, 2-bit ternary IQ2_BN"
        if not find("iq2_bn_r4").shape_problems(src):
            return "iq2_bn_r4", (f"{what}: {odd}{where['ik_llama.cpp']}; rows of {min(rows)} values are under "
                                 f"IQ2_BN's {find('iq2_bn').min_row}, so its 4-row repack IQ2_BN_R4, which takes them")
        if "llama.cpp" not in where:
            return "f16", f"{what}: {where['ik_llama.cpp']}; no ternary type of ik packs these rows, so F16"
    if not find("q2_0").shape_problems(src):
        return "q2_0", (f"{what}: {odd}{where['llama.cpp']}, Q2_0 (blocks of 64; ik_llama.cpp, whose IQ2_BN decodes "
                        f"faster on x86 CPUs, is {'not installed' if not ik_ok else 'unable to pack these rows'}; "
                        "llama.cpp runs Q2_0 on CPU, CUDA, Metal and Vulkan, but slower than F16 on AVX2 CPUs)")
    return "f16", f"{what}: {where['llama.cpp']}; rows of {sorted(rows)} values pack in no ternary type, so F16"


def _shape_hint(src, fmt: Format, block: int | None) -> str:
    if fmt.fallback:
        return (". Choose a shape whose input sizes (hidden_size, intermediate_size) are multiples of "
                f"{block}, export --quant f16, or pass --tq-fallback f16 to store such tensors as F16 codes")
    ok = [f.quant for f in FORMATS if f.runtime == fmt.runtime and f.ggml_type is not None and f is not fmt
          and not f.shape_problems(src)]
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


def _size(p: Path) -> str:
    p = Path(p)
    n = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return f"{n / 2**20:.1f} MiB"


__all__ = ["ExportError", "export", "register"]

