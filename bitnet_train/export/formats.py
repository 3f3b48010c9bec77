"""Every export format in one table: a :class:`Format` record says which runtime runs it, in which graph,
which rows it packs, how close that runtime must come to our forward, and which writer makes it.

A GGUF architecture is a :class:`Graph`: what the runtime's computation hardcodes (the FFN activation,
whether the head is the embedding, whether it loads ``.scale`` tensors), so whether a model fits it is
one function (:func:`graph_mismatches`) for every runtime. Adding a format is one record (and a writer
where no existing one makes it); adding a runtime is one class in :mod:`bitnet_train.runtimes`.

Tolerances: the runtime's logits against the trainer's forward on a probe text (max relative error,
min top-1 agreement), and for F32/F16, whose runtimes quantize no activations, a tight second bound
against our forward with the runtime's arithmetic emulated (:func:`.verify.emulated_logits`); for a model
sensitive to its activation arithmetic, twice that sensitivity instead (:class:`.verify.Agreement`). Measured
(docs/export.md, docs/runtimes.md) on tiny models trained 40 steps and random-initialised ones:
- ``hf``: stock transformers unpacks the same codes and quantizes activations the same way (per token
  int8); only float summation order differs: 1e-7 to 1.5e-5.
- llama.cpp F32/F16 1.8e-3, TQ2_0/TQ1_0 1.3e-3, top-1 100%; random init F32 2.8e-2, TQ2_0 2.8e-2-3.0e-2,
  top-1 92-95% (llama.cpp quantizes TQ activations in 256-wide Q8_K blocks, not per token). Emulated:
  1.7e-5 F32, 2.8e-5 F16 trained, 3.6e-4 F32 random. A ReLU² model forced through llama.cpp: 1.1e-1.
- llama.cpp Q2_0 (``python scripts/bench_tolerances.py logits --runtime llama.cpp --seeds 0,1``; converted tiny Llamas random
  and after 100 + 60 steps, tiny-silu BitNet at 0 and 40 steps): 8.1e-4 to 2.5e-3 against our forward
  trained, 1.9e-3 to 3.1e-2 random, top-1 94-100%; against the Q2_0 emulation (weights ``codes * fp16(s)``,
  Q8_0 activations) 1.4e-4 to 1.1e-3 trained, 7.7e-4 to 1.5e-2 random. Wrong files on the trained Llama:
  q/k rows not permuted for ``llama`` 9.6e-2 against both, the scale dropped 6.7e-1.
- bitnet.cpp I2_S (per-token int8 activations as ours, exact code products; token_embd and the KV cache
  F16): 2.8e-4 to 9.3e-4 trained, 2.8e-2 random; a wrong block layout, a transposed or shifted packing
  or a dropped scale 1.6e-1 to 1.3e+0.
- ik_llama.cpp (``python scripts/bench_tolerances.py logits --runtime ik_llama.cpp --widths 256,512 --seeds 0,1 --steps 0,40``):
  F32/F16 1.8e-3 to 2.9e-3, IQ2_BN 1.6e-3 to 2.0e-3, IQ2_BN_R4 1.4e-3 to 2.1e-3, IQ1_BN 1.6e-3 to 1.9e-3,
  top-1 99-100%; random init 2.9e-2 to 3.6e-2, top-1 91-98% (the IQ types quantize activations in
  Q8_K64 blocks, so their top-1 floor is lower and they are not emulated). Emulated F32/F16: 1.1e-5 to
  5.7e-5 trained, at most 3.6e-4 (F32) and 8.7e-4 (F16) random. Scales not folded in: far outside.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitnet_train.errors import ExportError
from bitnet_train.runtimes.bitnetcpp import GGML_TYPE_I2_S
from bitnet_train.runtimes.ikllama import GGML_TYPES as IK_TYPES
from bitnet_train.runtimes.llamacpp import GGML_TYPE_Q2_0

TERNARY_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@dataclass(frozen=True)
class Graph:
    """A runtime's graph for one GGUF architecture, and what it hardcodes."""

    arch: str  # general.architecture
    runtime: str  # the engine (bitnet_train.runtimes.ENGINES) that computes it
    model_types: tuple  # the transformers model_type(s) whose forward it is
    hidden_act: str  # the gated FFN's activation it computes
    head_is_embedding: bool  # True: token_embd is the output matrix (an untied head is ignored)
    folds_scales: bool  # True: loads no .scale tensors (ternary weights stored as codes * scale)
    other: str  # where a model of the other activation goes (the words of the refusal)
    permute_qk: bool = False  # q/k rows in llama.cpp's llama rotary order (convert_hf_to_gguf.py's permute)
    qkv_bias: bool = False  # loads q/k/v biases (attn_q.bias, ...), as llama.cpp's qwen2 graph does


GRAPHS = {
    # BitNet (sub-norms before o_proj and down_proj), SiLU FFN, the head tied to token_embd
    "bitnet": Graph("bitnet", "llama.cpp", ("bitnet",), "silu", True, False,
                    "ReLU² models (2B4T's block) run in ik_llama.cpp: --quant iq2_bn, iq2_bn_r4, iq1_bn, f16 or f32 "
                    "(or no --quant: the best one is chosen). The *-silu presets (SiLU FFN, tied embeddings) are the "
                    "ones llama.cpp runs"),
    # bitnet-25, not bitnet-b1.58: both reach ik's ReLU² graph, but bitnet.cpp's current fork loads
    # bitnet-b1.58 with a hardcoded SiLU FFN (microsoft/BitNet#588), so a file named so would run there, wrong
    "bitnet-25": Graph("bitnet-25", "ik_llama.cpp", ("bitnet",), "relu2", False, True,
                       "SiLU models export to llama.cpp: --quant tq2_0, tq1_0, q2_0, f16 or f32"),
    # a Llama-shaped model converted to ternary (Llama, Mistral without a sliding window, SmolLM): llama.cpp
    # computes it as a plain llama whose weight tensors hold ternary values (codes * scale) in a 2-bit type
    "llama": Graph("llama", "llama.cpp", ("llama", "mistral"), "silu", False, True,
                   "llama.cpp's llama graph computes a SiLU gated FFN", permute_qk=True),
    # a SiLU BitNet in ik_llama.cpp's bitnet graph (SiLU, sub-norms, the tied head: llama.cpp's), its weights
    # in ik's ternary types, whose per-row scale holds our per-tensor one (written folded, no .scale tensors)
    "bitnet@ik": Graph("bitnet", "ik_llama.cpp", ("bitnet",), "silu", True, True,
                       "ReLU² models (2B4T's block) run in ik_llama.cpp's bitnet-25 graph, which this format also "
                       "writes for them"),
    # a converted Qwen2 (q/k/v with biases, no sliding window): llama.cpp's qwen2 graph, whose NEOX rotary order
    # is transformers' own (convert_hf_to_gguf.py permutes nothing for it)
    "qwen2": Graph("qwen2", "llama.cpp", ("qwen2",), "silu", False, True,
                   "llama.cpp's qwen2 graph computes a SiLU gated FFN", qkv_bias=True),
    # the same model in ik_llama.cpp's llama graph (a fork of llama.cpp's: the same rotary order), where ik's
    # ternary types hold the weights
    "llama@ik": Graph("llama", "ik_llama.cpp", ("llama", "mistral"), "silu", False, True,
                      "ik_llama.cpp's llama graph computes a SiLU gated FFN", permute_qk=True),
    "qwen2@ik": Graph("qwen2", "ik_llama.cpp", ("qwen2",), "silu", False, True,
                      "ik_llama.cpp's qwen2 graph computes a SiLU gated FFN", qkv_bias=True),
}
CONVERTED_TYPES = ("llama", "mistral", "qwen2")  # model_types of the converted models we export (their own graphs)


def graph_for(src, runtime: str, quant: str) -> Graph:
    """The graph of ``runtime`` that computes the checkpoint ``src`` in ``quant`` (by its ``model_type`` and
    FFN activation); for a model no graph computes, the first graph of its ``model_type`` that takes
    ``quant``, else the first one (its mismatches then say why)."""
    graphs = [GRAPHS[g] for g in find(quant, runtime).graphs]
    mt = src.config.get("model_type")
    for g in graphs:
        if mt in g.model_types and g.hidden_act == src.hidden_act:
            return g
    return next((g for g in graphs if mt in g.model_types), graphs[0])


def graph_mismatches(src, graph: Graph, runtime: str | None = None) -> list[str]:
    """Ways ``graph`` (in ``runtime``, default the graph's own: bitnet.cpp runs llama.cpp's ``bitnet``
    graph too) would compute something other than the checkpoint ``src`` (empty: it computes it)."""
    c, where = src.config, f"{runtime or graph.runtime}'s '{graph.arch}' graph"
    out = []
    if c.get("model_type") not in graph.model_types:
        takes = ", ".join(f"'{g.arch}' ({'/'.join(g.model_types)})" for g in GRAPHS.values()
                          if g.runtime == (runtime or graph.runtime))
        out.append(f"config.json model_type is {c.get('model_type')!r}; {where} computes {'/'.join(graph.model_types)} "
                   f"models (the graphs exported for {runtime or graph.runtime}: {takes})")
    if src.hidden_act != graph.hidden_act:
        act = {"silu": "hardcodes a SiLU gated FFN", "relu2": "computes a ReLU² gated FFN"}[graph.hidden_act]
        out.append(f"hidden_act is {src.hidden_act!r}; {where} {act} ({graph.other})")
    if graph.head_is_embedding and not src.head_is_embedding():
        out.append(f"the output head (lm_head) is untied from the token embedding; {where} uses token_embd as the "
                   "output matrix (train with tie_word_embeddings: true)")
    if src.qc.get("use_rms_norm"):
        out.append(f"the BitLinear layers have an input RMSNorm (use_rms_norm), which {where} lacks")
    biases = sorted({k.rsplit(".", 2)[-2] for k in src.keys() if k.endswith(".bias")})
    takes = {"q_proj", "k_proj", "v_proj"} if graph.qkv_bias else set()
    if set(biases) - takes:
        out.append(f"the model has biases in {biases}, which {where} lacks"
                   + (f" (it takes {sorted(takes)} only)" if takes else ""))
    window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
    if window and window < int(c.get("max_position_embeddings") or 0):
        out.append(f"config.json sliding_window is {window}; {where} attends to the whole context")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        out.append(f"rope_type is {rope.get('rope_type')!r}; only default RoPE is exported")
    mods = {m.rsplit(".", 1)[-1] for m in src.ternary_modules}
    if mods != TERNARY_PROJECTIONS:
        out.append(f"the ternary layers are {sorted(mods)}; {where} expects exactly {sorted(TERNARY_PROJECTIONS)} "
                   "ternary")
    return out


@dataclass(frozen=True)
class Tolerance:
    max_rel: float  # relative logit error against the trainer's forward
    min_top1: float  # share of probe positions with the same argmax
    max_emulated: float | None = None  # against our forward with the runtime's arithmetic (emulate)


@dataclass(frozen=True)
class Format:
    """One export format: ``quant`` (the ``--quant`` name, ``hf`` for the transformers directory) as
    ``runtime`` runs it."""

    quant: str
    runtime: str
    graphs: tuple  # the GRAPHS it is written for (the model picks one, graph_for); () for hf
    tolerance: Tolerance
    block: int | None = None  # values per quantization block along a row (None: any row)
    min_row: int | None = None  # the shortest row the runtime takes (ik's Q8_K64 activations)
    row_group: int | None = None  # rows interleaved together (a tensor's rows must be a multiple)
    row_multiple: int | None = None  # rows (values) a multiple of this, beyond the block: a runtime's kernel rule
    emulate: str | None = None  # "f32"/"f16": the runtime's arithmetic that verify.emulated_logits reproduces
    isolated: bool = False  # verify in a child process (the runtime aborts on some input)
    ggml_type: int | None = None  # the type id of its ternary tensors in the runtime's ggml
    fallback: bool = False  # --tq-fallback may store rows it cannot pack as F16/F32 codes
    our_activations: bool = False  # its runtime quantizes activations per token to int8 as we do (no sensitivity)

    @property
    def key(self) -> str:
        """How reports name it: the quant, with the runtime where the quant alone is ambiguous."""
        return f"ik_{self.quant}" if self.runtime == "ik_llama.cpp" and self.quant in ("f16", "f32") else self.quant

    def shape_problems(self, src, block: int | None = None) -> list[str]:
        """Every ternary tensor of ``src`` this format cannot pack, with the rule it breaks (``block``
        overrides the record's, for I2_S's layouts)."""
        block = block or self.block
        name, out = self.quant.upper(), []
        for key in src.keys():
            if not src.is_ternary(key):
                continue
            rows, k = src.shape(key)[0], src.shape(key)[-1]
            if block and k % block:
                out.append(f"tensor {key!r} has rows of {k} values, not a multiple of {block} ({name} packs blocks "
                           f"of {block})")
            elif self.row_multiple and k % self.row_multiple:
                out.append(f"tensor {key!r} has rows of {k} values, not a multiple of {self.row_multiple} "
                           f"({self.runtime}'s {name} product is wrong on rows holding an odd number of its "
                           f"{block}-value blocks: measured, docs/runtimes.md)")
            elif self.min_row and k < self.min_row:
                out.append(f"tensor {key!r} has rows of {k} values; {name} needs at least {self.min_row} "
                           f"({self.runtime} quantizes its activations to Q8_K64, which aborts on rows under "
                           f"{self.min_row})")
            if self.row_group and rows % self.row_group:
                out.append(f"tensor {key!r} has {rows} rows, not a multiple of {self.row_group} ({name} interleaves "
                           f"{self.row_group} rows)")
        return out


    @property
    def is_gguf(self) -> bool:
        return bool(self.graphs)


_FLOAT_GGUF = Tolerance(5e-2, 0.90, 2e-3)
_IK_TERNARY = Tolerance(5e-2, 0.85)
IK_BLOCK, IK_MIN_ROW = 64, 512  # QK_IQ1BN; 8 * QK_IQ1BN
TQ_BLOCK = 256
I2S_BLOCKS = {"x86": 128, "arm": 64}  # values per block (bitnet.cpp's QK_I2_S) by build

_LLAMA_CPP = ("bitnet", "llama", "qwen2")
_IK = ("bitnet-25", "bitnet@ik", "llama@ik", "qwen2@ik")
FORMATS = [
    Format("hf", "transformers", (), Tolerance(1e-3, 0.99), our_activations=True),
    Format("tq2_0", "llama.cpp", _LLAMA_CPP, Tolerance(5e-2, 0.90), block=TQ_BLOCK, fallback=True),
    Format("tq1_0", "llama.cpp", _LLAMA_CPP, Tolerance(5e-2, 0.90), block=TQ_BLOCK, fallback=True),
    # llama.cpp's Q2_0 (llama-cpp-python 0.3.36 on): blocks of 64 with an fp16 scale, written by ggml's own
    # quantizer; ternary x s comes back exact up to the fp16 rounding of s. Its emulation (Q8_0 activations)
    # is looser than F32/F16's: 1.4e-4 to 1.1e-3 trained, 1.3e-2 to 1.5e-2 random init (see the docstring)
    Format("q2_0", "llama.cpp", _LLAMA_CPP, Tolerance(5e-2, 0.90, 3e-2), block=64, fallback=True,
           ggml_type=GGML_TYPE_Q2_0, emulate="q2_0"),
    Format("f16", "llama.cpp", _LLAMA_CPP, _FLOAT_GGUF, emulate="f16"),
    Format("f32", "llama.cpp", _LLAMA_CPP, _FLOAT_GGUF, emulate="f32"),
    Format("i2_s", "bitnet.cpp", ("bitnet",), Tolerance(5e-2, 0.90), block=I2S_BLOCKS["x86"], fallback=True,
           ggml_type=GGML_TYPE_I2_S, our_activations=True),
    # IQ2_BN's product (ik-llama-cpp-python 0.1.5, AVX2) is wrong on rows with an odd number of 64-value
    # blocks: a converted SmolLM2 (rows of 576) verified at 0.69 against our forward, its IQ2_BN_R4 and IQ1_BN
    # files at 4.0e-2 and 4.8e-2; 2-layer models at 576 / 640 wide: 5.3e-3 / 1.1e-3 (IQ2_BN_R4 9.3e-4 / 1.1e-3)
    Format("iq2_bn", "ik_llama.cpp", _IK, _IK_TERNARY, block=IK_BLOCK, min_row=IK_MIN_ROW, isolated=True,
           ggml_type=IK_TYPES["iq2_bn"][0], row_multiple=2 * IK_BLOCK),
    Format("iq2_bn_r4", "ik_llama.cpp", _IK, _IK_TERNARY, block=IK_BLOCK, row_group=4, isolated=True,
           ggml_type=IK_TYPES["iq2_bn_r4"][0]),
    Format("iq1_bn", "ik_llama.cpp", _IK, _IK_TERNARY, block=IK_BLOCK, min_row=IK_MIN_ROW, isolated=True,
           ggml_type=IK_TYPES["iq1_bn"][0]),
    Format("f16", "ik_llama.cpp", _IK, _FLOAT_GGUF, emulate="f16", isolated=True),
    Format("f32", "ik_llama.cpp", _IK, _FLOAT_GGUF, emulate="f32", isolated=True),
]
GGUF_QUANTS = tuple(dict.fromkeys(f.quant for f in FORMATS if f.is_gguf))
ROW_BLOCKS = {f.quant: f.block for f in FORMATS if f.block}  # values per block along a row, by --quant


@dataclass(frozen=True)
class EmbedType:
    """A storage type for ``token_embd`` (which the graphs with a tied head also multiply as the output
    matrix) and an untied ``output.weight``: ``--embed-type`` / ``--output-type``."""

    name: str  # the --embed-type name
    ggml_type: int  # ggml's type id (the same in llama.cpp, ik_llama.cpp and bitnet.cpp)
    block: int | None  # values per block along a row (the hidden size must be a multiple)
    bits: float  # bits per weight
    activations: str | None  # what the runtime does to the head's input before the product (verify's emulation)


# ggml.h: GGML_TYPE_F32 0, F16 1, Q8_0 8, Q6_K 14. A K-quant's product with the head's input quantizes that
# input to Q8_K (blocks of 256), Q8_0's to Q8_0 (blocks of 32), F16's rounds it to fp16
EMBED_TYPES = {
    "f32": EmbedType("f32", 0, None, 32.0, None),
    "f16": EmbedType("f16", 1, None, 16.0, "f16"),
    "q8_0": EmbedType("q8_0", 8, 32, 8.5, "q8_0"),
    "q6_k": EmbedType("q6_k", 14, 256, 6.5625, "q8_k"),
}


def embed_problems(src, embed_type: str, what: str = "--embed-type", key: str = "model.embed_tokens.weight") -> list[str]:
    """Why ``embed_type`` cannot store the tensor ``key`` (the embedding, or an untied ``lm_head.weight``)."""
    t = EMBED_TYPES[embed_type]
    width = src.shape(key)[-1]
    if t.block and width % t.block:
        return [f"{what} {embed_type}: tensor {key!r} has rows of {width} values, not a multiple "
                f"of {t.block} ({embed_type.upper()} packs blocks of {t.block}); "
                + ", ".join(n for n, e in EMBED_TYPES.items() if not e.block or width % e.block == 0) + " take it"]
    return []


def default_embed_type(src, quant: str) -> tuple[str, str]:
    """``token_embd``'s storage when ``--embed-type`` is not given, and why (the words printed). F16 and F32
    files keep the embedding in their own type; the ternary formats take Q8_0, whose rows of 32 fit any
    hidden size we train: with a tied head the embedding is the output matrix, read in full for every
    decoded token (docs/runtimes.md, "Embedding types", has the measured speed and bits per byte)."""
    if quant in ("f16", "f32"):
        return quant, f"the {quant.upper()} file's own type"
    if embed_problems(src, "q8_0"):
        return "f16", f"rows of {src.shape('model.embed_tokens.weight')[-1]} values are not multiples of Q8_0's 32"
    return "q8_0", "Q8_0: half the bytes of F16 for the output matrix read at every decoded token"


def find(quant: str, runtime: str | None = None) -> Format:
    """The record of ``quant`` in ``runtime`` (None: the only runtime that has it)."""
    found = [f for f in FORMATS if f.quant == quant and (runtime is None or f.runtime == runtime)]
    if not found:
        have = sorted({f.runtime for f in FORMATS if f.quant == quant})
        if have:
            raise ExportError(f"--quant {quant} is {' and '.join(have)}'s format; --runtime {runtime} applies to "
                              "f16/f32 only")
        raise ExportError(f"--quant {quant!r}: GGUF formats are {', '.join(GGUF_QUANTS)}")
    if len(found) > 1:
        raise ExportError(f"--quant {quant} runs in {' or '.join(f.runtime for f in found)}: say which with --runtime")
    return found[0]
