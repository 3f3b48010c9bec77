"""GGUF export for ik_llama.cpp (ikawrakow/ik_llama.cpp), the CPU runtime that computes ReLU² BitNet.

llama.cpp's ``bitnet`` graph hardcodes a SiLU FFN, and so does bitnet.cpp's current fork; ik_llama.cpp's
``bitnet-25`` / ``bitnet-b1.58`` architectures run the 2B4T block as it is (ReLU² gated FFN,
``attn_sub_norm`` and ``ffn_sub_norm``, ``token_embd`` as the output matrix unless ``output.weight``
is present). It is on PyPI as the prebuilt CPU wheel ``ik-llama-cpp-python`` (module ``ik_llama_cpp``),
which also ships ik's ``llama-quantize``.

Architecture: we write ``bitnet-25``. Both names reach the same ReLU² graph in ik_llama.cpp, but
``bitnet-b1.58`` is also the name bitnet.cpp's current fork loads and runs with a hardcoded SiLU FFN
(microsoft/BitNet#588), so a file named so would run there, wrong; llama.cpp (llama-cpp-python
0.3.36) knows neither name and refuses the file (tested), and ``generate`` picks ik_llama.cpp by it.

Layout: that graph loads no ``.scale`` tensors, so each ternary weight is written as
``codes * scale`` (:func:`bitnet_train.quant.weight_dequant`): F32 exactly, F16 with the scale rounded
to fp16. IQ1_BN (1.625 bits per weight) and IQ2_BN (2.0; IQ2_BN_R4 is its 4-row interleaved repack)
are made from that F32 file by ik's own ``llama-quantize`` (``--pure``; ``token_embd`` and an untied
``output.weight`` stay F16): each row gets one float scale (its absmax, our scale) and 2-bit (or 1.6-bit)
codes, exact for ternary rows. Norms are F32.

Shapes (the formats' records, :mod:`.formats`, checked before anything is written): IQ1_BN and IQ2_BN quantize
activations to Q8_K64, which aborts the process (``GGML_ASSERT(k >= 8*QK_IQ1BN)``) for rows under
512 values; all three types pack blocks of 64.

A SiLU BitNet model goes to ik's ``bitnet`` graph (llama.cpp's: SiLU, sub-norms, the tied head) and a
converted Llama-shaped or Qwen2 model (``convert``, or training with ``model: hf:...``) to ik's ``llama`` /
``qwen2`` graph (q/k rows in llama's rotary order as for llama.cpp, :mod:`.gguf`), the same way and in the
same types.

Verification runs the file in ik_llama.cpp (:class:`bitnet_train.runtimes.ikllama.IkLlama`) in a child
process, so that an abort inside the runtime fails the export instead of killing it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bitnet_train.runtimes.base import default_threads
from bitnet_train.runtimes.gguf_header import read_header
from bitnet_train.runtimes.ikllama import GGML_TYPES, quantize_bin
from bitnet_train.export.formats import EMBED_TYPES, GRAPHS, Graph, find
from bitnet_train.errors import ExportError
from bitnet_train.export.source import CheckpointSource

ARCH = "bitnet-25"
QUANTS = ("iq2_bn", "iq2_bn_r4", "iq1_bn", "f16", "f32")


def write_ik(src: CheckpointSource, out: Path, quant: str, tokenizer, force: bool = False, progress=None,
             threads: int | None = None, embed_type: str | None = None, output_type: str | None = None,
             graph: Graph = GRAPHS[ARCH]) -> dict:
    """Write ``src`` as an ik_llama.cpp GGUF at ``out`` (the caller makes it atomic) for ``graph`` (``bitnet-25``
    for ReLU², ``bitnet`` for SiLU BitNet, ``llama`` / ``qwen2`` for converted models); ``embed_type`` / ``output_type``: ``token_embd``'s and an
    untied ``output.weight``'s storage (default F16; F32 for ``--quant f32``)."""
    from bitnet_train.export.gguf import write_gguf

    if quant not in QUANTS:
        raise ExportError(f"--quant {quant!r}: ik_llama.cpp formats are {', '.join(QUANTS)}")
    problems = find(quant, "ik_llama.cpp").shape_problems(src)
    if problems:
        raise ExportError(f"ik_llama.cpp cannot run this model as {quant.upper()}: " + "; ".join(problems))
    if quant in ("f16", "f32"):
        r = write_gguf(src, out, quant, tokenizer, force=force, progress=progress, graph=graph,
                       embed_type=embed_type, output_type=output_type)
        return {**r, "arch": graph.arch}
    embed_type = embed_type or "f16"
    output_type = output_type or embed_type
    exe = quantize_bin()  # before the F32 file is written: fail early (EngineError: not installed)
    f32 = out.with_name(out.name + "-f32")  # inside the caller's temporary name, so leftovers are tidied
    try:
        r = write_gguf(src, f32, "f32", tokenizer, force=force, progress=progress, graph=graph)
        # token_embd (and an untied output.weight) in the asked types, by ik's own quantizer; the rest of
        # the non-ternary tensors are 1-D norms, which llama-quantize leaves F32
        cmd = [str(exe), "--pure", "--token-embedding-type", _ggml_name(embed_type),
               "--output-tensor-type", _ggml_name(output_type),
               str(f32), str(out), GGML_TYPES[quant][1], str(threads or default_threads())]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0 or not out.is_file():
            raise ExportError(f"ik_llama.cpp's llama-quantize failed (exit {p.returncode}) making {quant.upper()}: "
                              f"{(p.stderr or p.stdout).strip()[-1500:]}")
    finally:
        f32.unlink(missing_ok=True)
    types = {name: t for name, _dims, t in read_header(out)[1]}
    want = GGML_TYPES[quant][0]
    wrong = [n for n, k in _ternary_names(src) if types.get(n) != want]
    if types.get("token_embd.weight") != EMBED_TYPES[embed_type].ggml_type:
        wrong.append("token_embd.weight")
    if wrong:
        raise ExportError(f"llama-quantize did not store {wrong[:3]} as asked ({quant.upper()}, token_embd "
                          f"{embed_type.upper()}): their types {[types.get(n) for n in wrong[:3]]}")
    r["ternary_storage"] = {quant: len(_ternary_names(src))}
    return {**r, "arch": graph.arch, "embed_type": embed_type, "output_type": output_type if "output.weight" in types else None}


def _ggml_name(embed_type: str) -> str:
    """ggml's name of an embedding type, as llama-quantize reads it (``q6_K``)."""
    return embed_type[:-1] + "K" if embed_type.endswith("_k") else embed_type


def _ternary_names(src: CheckpointSource) -> list[tuple[str, str]]:
    from bitnet_train.export.gguf import gguf_name

    return [(gguf_name(k), k) for k in src.keys() if src.is_ternary(k)]
