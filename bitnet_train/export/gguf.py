"""GGUF export for llama.cpp's ``bitnet``, ``llama`` and ``qwen2`` architectures (TQ2_0, TQ1_0, Q2_0, F16,
F32), bitnet.cpp's I2_S, and the F32/F16 files ik_llama.cpp's graphs read (:mod:`.ik` makes its IQ types
from them).

Written with the ``gguf`` package: its ``GGUFWriter`` (tensor infos first, then the data one
tensor at a time, so memory stays near one tensor) and its TQ1_0/TQ2_0 quantizers.

Layout. Every ternary weight is stored as its codes ({-1, 0, 1}, exact in every format: a TQ
block's fp16 scale is its absmax, 1) plus a one-element F32 ``<name>.scale`` tensor holding the
absmean scale ``s``; llama.cpp's ``bitnet`` graph multiplies each projection's output by it.
Norms are F32; ``token_embd`` (which llama.cpp also uses as the output matrix) and an untied
``output.weight`` are stored in ``embed_type`` / ``output_type`` (:data:`~.formats.EMBED_TYPES`: F32, F16,
or ggml's Q8_0 / Q6_K written by ggml's own quantizer), by default F32 for ``f32`` and F16 otherwise.

I2_S (bitnet.cpp's GGML type 36, unknown to the ``gguf`` package and to llama.cpp) is written
through the same ``GGUFWriter`` with the type id given as a raw number. Layout, from bitnet.cpp's
``quantize_i2_s`` (src/ggml-bitnet-mad.cpp): each code + 1 (-1→0, 0→1, +1→2) in 2 bits; the
row-major ``[out, in]`` tensor is cut into blocks of ``B`` values (128 for x86 builds, and for
every build before its 2025 ARM kernels; 64 in today's ARM builds), and value ``j`` of a block
goes to byte ``j % (B/4)`` of the block's ``B/4`` bytes at bit shift ``6 - 2*(j // (B/4))``. After
the ``n/4`` code bytes comes the tensor's F32 scale, then padding to ``n/4 + 32`` bytes (the size
bitnet.cpp's ``ggml_nbytes`` gives). bitnet.cpp multiplies each I2_S matmul by that embedded
scale, so I2_S tensors get no ``.scale`` tensor.

llama.cpp's graph hardcodes a SiLU gated FFN and the tied output matrix, so a ReLU² model or an
untied head is refused unless forced (:func:`bitnet_train.export.formats.graph_mismatches`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from bitnet_train.runtimes.base import strip_generation_tags
from bitnet_train.runtimes.bitnetcpp import FILE_TYPE_I2_S as I2S_FILE_TYPE
from bitnet_train.runtimes.bitnetcpp import GGML_TYPE_I2_S as I2S_TYPE
from bitnet_train.runtimes.llamacpp import FILE_TYPE_Q2_0, GGML_TYPE_Q2_0, ggml_quantize, ggml_row_bytes
from bitnet_train.export.formats import EMBED_TYPES, GRAPHS, I2S_BLOCKS, ROW_BLOCKS, Graph
from bitnet_train.errors import ExportError
from bitnet_train.export.source import CheckpointSource

ARCH = "bitnet"
QUANTS = ("tq2_0", "tq1_0", "q2_0", "f16", "f32", "i2_s")
I2S_TAIL = 32  # the scale (4 bytes) and padding after the codes
I2S_LAYOUTS = I2S_BLOCKS  # values per block (bitnet.cpp's QK_I2_S) by build

# checkpoint key (after model.layers.N.) -> GGUF name (after blk.N.)
_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",  # Qwen2's q/k/v biases (the qwen2 graph)
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.attn_sub_norm.weight": "attn_sub_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.ffn_sub_norm.weight": "ffn_sub_norm.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_name(key: str, arch: str = ARCH) -> str:
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    m = _LAYER_RE.match(key)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"blk.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    raise ExportError(f"tensor {key!r} has no place in the GGUF architecture '{arch}'")


def _block(storage: str, i2s_layout: str = "x86") -> int | None:
    """Values per quantization block along a row (None: any row length)."""
    if storage == "i2_s":
        return I2S_LAYOUTS[i2s_layout]
    return ROW_BLOCKS.get(storage)


def pack_i2s(codes: np.ndarray, scale: float, block: int = 128) -> np.ndarray:
    """bitnet.cpp's I2_S bytes for ternary ``codes`` ([out, in], values -1/0/1) and their scale."""
    q = (np.asarray(codes).reshape(-1).astype(np.int16) + 1).astype(np.uint8)
    n = q.size
    if n % block:
        raise ExportError(f"I2_S packs blocks of {block} values; this tensor has {n}")
    group = block // 4
    q = q.reshape(n // block, 4, group)  # [block, j // group, j % group]
    packed = (q[:, 0] << 6) | (q[:, 1] << 4) | (q[:, 2] << 2) | q[:, 3]
    out = np.zeros(n // 4 + I2S_TAIL, dtype=np.uint8)
    out[: n // 4] = packed.reshape(-1)
    out[n // 4 : n // 4 + 4] = np.frombuffer(np.float32(scale).tobytes(), dtype=np.uint8)
    return out


def unpack_i2s(data: np.ndarray, shape: tuple[int, int], block: int = 128) -> tuple[np.ndarray, float]:
    """Inverse of :func:`pack_i2s`: (codes as int8 ``shape``, scale)."""
    data = np.asarray(data, dtype=np.uint8)
    n = int(np.prod(shape))
    group = block // 4
    b = data[: n // 4].reshape(n // block, 1, group)
    q = (b >> np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)) & 3
    codes = q.reshape(shape).astype(np.int8) - 1
    scale = float(np.frombuffer(data[n // 4 : n // 4 + 4].tobytes(), dtype=np.float32)[0])
    return codes, scale


def _qtype(quant: str):
    from gguf import GGMLQuantizationType as Q

    if quant == "q2_0":  # not in the gguf package's enum: the raw id, quantized by ggml itself
        return GGML_TYPE_Q2_0
    return {"tq2_0": Q.TQ2_0, "tq1_0": Q.TQ1_0, "f16": Q.F16, "f32": Q.F32}[quant]


def _file_type(quant: str):
    from gguf import LlamaFileType as F

    if quant == "i2_s":
        return I2S_FILE_TYPE
    if quant == "q2_0":
        return FILE_TYPE_Q2_0
    return {"tq2_0": F.MOSTLY_TQ2_0, "tq1_0": F.MOSTLY_TQ1_0, "f16": F.MOSTLY_F16, "f32": F.ALL_F32}[quant]


# ----------------------------------------------------------------------------------------------
# tokenizer metadata
# ----------------------------------------------------------------------------------------------

# the byte-level pre-tokenizer regexes llama.cpp knows by name (llama-vocab.cpp): Llama 3's, and Qwen2's
# (digits one at a time)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_NAMES = {_LLAMA3_REGEX: "llama-bpe", _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2"}


def _pre_tokenizer_name(tj: dict) -> str | None:
    """llama.cpp's name for this tokenizer's pre-tokenization (None: not one llama.cpp knows)."""
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (
            len(parts) == 2
            and parts[0].get("type") == "Split"
            and parts[0].get("pattern", {}).get("Regex") in _SPLIT_NAMES
            and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)
        ):
            return _SPLIT_NAMES[parts[0]["pattern"]["Regex"]]
    return None


def add_tokenizer(writer, tok, vocab_size: int, force: bool = False) -> str:
    """Write a byte-level BPE tokenizer (tokens, merges, types, special ids, chat template) into
    the GGUF metadata. Returns llama.cpp's pre-tokenizer name."""
    import gguf

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"tokenizer {type(tok).__name__} is not a fast (tokenizers) tokenizer; GGUF export needs one")
    tj = json.loads(backend.to_str())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer model is {model.get('type')!r}; GGUF export writes byte-level BPE tokenizers only")
    pre = _pre_tokenizer_name(tj)
    if pre is None:
        msg = (
            "the tokenizer's pre-tokenizer is not one llama.cpp knows by name (gpt-2 or llama-bpe byte level), "
            "so llama.cpp would split text differently"
        )
        if not force:
            raise ExportError(msg + "; pass --force to write it as gpt-2 anyway")
        print(f"warning: {msg}; writing it as gpt-2 (--force)")
        pre = "gpt-2"
    vocab = tok.get_vocab()
    n = len(vocab)
    if n > vocab_size:
        raise ExportError(f"the tokenizer has {n} tokens but the model's embedding only {vocab_size} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {a.content: a for a in tok.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[t].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    merges = model.get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        tid = getattr(tok, attr, None)
        if tid is not None:
            add(int(tid))
    probe = tok("a")["input_ids"]
    writer.add_add_bos_token(bool(tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id))
    writer.add_add_eos_token(bool(tok.eos_token_id is not None and probe and probe[-1] == tok.eos_token_id))
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(strip_generation_tags(template))
    return pre


# ----------------------------------------------------------------------------------------------
# the writer
# ----------------------------------------------------------------------------------------------


def plan(
    src: CheckpointSource, quant: str, tq_fallback: str | None = None, i2s_layout: str = "x86",
    graph: Graph = GRAPHS[ARCH], embed_type: str | None = None, output_type: str | None = None,
) -> list[tuple[str, str, str, str]]:
    """(gguf name, checkpoint key, kind, storage) for every tensor, in file order.

    kind: ``ternary`` (codes; a ``.scale`` tensor follows unless the storage embeds it, as I2_S
    does), ``folded`` (``codes * scale`` in one tensor, no ``.scale``: for graphs that load no
    scale tensors, ``graph.folds_scales``), ``scale``, ``embed``, ``head`` (an untied ``lm_head`` as
    ``output.weight``, for graphs that read one) or ``norm``. storage: ``tq2_0`` / ``tq1_0`` /
    ``q2_0`` / ``i2_s`` / ``f16`` / ``f32``, and for ``embed`` / ``head`` ``embed_type`` / ``output_type``
    (default: ``f32`` for ``--quant f32``, else ``f16``; ``output_type`` defaults to ``embed_type``)."""
    embed_type = embed_type or ("f32" if quant == "f32" else "f16")
    output_type = output_type or embed_type
    rows = []
    for key in src.keys():
        if key == "lm_head.weight":
            if not graph.head_is_embedding and not src.head_is_embedding():
                rows.append(("output.weight", key, "head", output_type))
            # else: the graph multiplies by token_embd (formats.graph_mismatches checks the model agrees)
            continue
        name = gguf_name(key, graph.arch)
        shape = src.shape(key)
        if src.is_ternary(key):
            storage = quant
            block = _block(quant, i2s_layout)
            if block and shape[-1] % block:
                if tq_fallback is None:
                    raise ExportError(
                        f"tensor {key!r} has rows of {shape[-1]} values, not a multiple of {block}: "
                        f"{quant.upper()} cannot pack it ({quant.upper()} quantizes in blocks of {block}). "
                        "Choose a shape whose input sizes (hidden_size, intermediate_size) are multiples of "
                        f"{block}, export --quant f16, or pass --tq-fallback f16 to store such tensors as F16 codes"
                    )
                storage = tq_fallback
            if graph.folds_scales:
                rows.append((name, key, "folded", storage))
                continue
            rows.append((name, key, "ternary", storage))
            if storage != "i2_s":
                rows.append((name[: -len(".weight")] + ".scale", key, "scale", "f32"))
        elif key == "model.embed_tokens.weight":
            rows.append((name, key, "embed", embed_type))
        elif len(shape) == 1:
            rows.append((name, key, "norm", "f32"))
        else:
            raise ExportError(f"tensor {key!r} of shape {list(shape)} is neither ternary, a norm nor the embedding")
    rows.sort(key=_order)
    return rows


def _order(row):
    name = row[0]
    if name.startswith("token_embd"):
        return (0, 0)
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]))  # stable sort: each .scale stays right after its weight
    return (2, 0)


def _encode(
    src: CheckpointSource, key: str, kind: str, storage: str, scales: dict, i2s_layout: str = "x86",
    graph: Graph = GRAPHS[ARCH],
) -> np.ndarray:
    """The bytes (or float array) GGUF stores for one tensor; reads only that tensor."""
    import gguf

    if kind == "scale":
        s = scales.pop(key, None)
        if s is None:
            _codes, s = src.ternary(key)
        return np.array([float(s)], dtype=np.float32)
    if kind == "ternary" and storage == "i2_s":
        codes, s = src.ternary(key)
        return pack_i2s(codes.numpy(), float(s), I2S_LAYOUTS[i2s_layout])
    if kind == "ternary":
        codes, s = src.ternary(key)
        scales[key] = float(s)
        arr = codes.numpy().astype(np.float32)
        del codes
    elif kind == "folded":
        from bitnet_train.quant import weight_dequant

        arr = weight_dequant(*src.ternary(key)).numpy()
    else:
        arr = src.tensor(key).float().numpy()
    if graph.permute_qk and kind in ("folded", "ternary"):
        arr = _rope_permuted(src, key, arr)
    if storage == "f32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    if storage == "f16":
        return arr.astype(np.float16)
    if storage in _GGML_STORAGE:
        return ggml_quantize(arr, _GGML_STORAGE[storage])
    return gguf.quants.quantize(arr, _qtype(storage))


# storages written by ggml's own quantizer (llama-cpp-python's libggml-base), by their ggml type id
_GGML_STORAGE = {"q2_0": GGML_TYPE_Q2_0, **{n: t.ggml_type for n, t in EMBED_TYPES.items() if t.block}}


def _rope_permuted(src: CheckpointSource, key: str, arr: np.ndarray) -> np.ndarray:
    """q/k rows reordered for llama.cpp's ``llama`` rotary convention (pairs of a head's two halves
    interleaved), as llama.cpp's ``convert_hf_to_gguf.py`` permutes them; other tensors unchanged."""
    c = src.config
    heads = int(c["num_attention_heads"])
    if key.endswith("self_attn.k_proj.weight"):
        heads = int(c.get("num_key_value_heads") or heads)
    elif not key.endswith("self_attn.q_proj.weight"):
        return arr
    return arr.reshape(heads, 2, arr.shape[0] // heads // 2, *arr.shape[1:]).swapaxes(1, 2).reshape(arr.shape)


def _info(src: CheckpointSource, key: str, kind: str, storage: str) -> tuple[tuple[int, ...], np.dtype, int, object]:
    import gguf

    shape = (1,) if kind == "scale" else src.shape(key)
    n = int(np.prod(shape))
    if storage == "f32":
        return shape, np.dtype(np.float32), 4 * n, None
    if storage == "f16":
        return shape, np.dtype(np.float16), 2 * n, None
    if storage in _GGML_STORAGE:
        t = _GGML_STORAGE[storage]
        return shape, np.dtype(np.int8), int(np.prod(shape[:-1])) * ggml_row_bytes(t, shape[-1]), t
    if storage == "i2_s":
        # the gguf package has no I2_S: the type id goes in raw, the shape as it is (int8 keeps
        # the writer from reading the byte count as a shape), the size as bitnet.cpp computes it
        return shape, np.dtype(np.int8), n // 4 + I2S_TAIL, I2S_TYPE
    q = _qtype(storage)
    bshape = gguf.quants.quant_shape_to_byte_shape(shape, q)
    return bshape, np.dtype(np.uint8), int(np.prod(bshape)), q


def write_gguf(
    src: CheckpointSource,
    out: Path,
    quant: str,
    tokenizer,
    tq_fallback: str | None = None,
    force: bool = False,
    name: str | None = None,
    progress=None,
    i2s_layout: str = "x86",
    graph: Graph = GRAPHS[ARCH],
    embed_type: str | None = None,
    output_type: str | None = None,
) -> dict:
    """Write ``src`` as a GGUF file at ``out`` (the caller makes it atomic). Returns a summary.

    ``graph`` (:data:`bitnet_train.export.formats.GRAPHS`) names the GGUF architecture (and so the prefix
    of the model keys) and says how its runtime reads weights: graphs that load no ``.scale`` tensors get
    each ternary weight as ``codes * scale``, graphs that read an output matrix an untied head as
    ``output.weight``, and ``llama`` its q/k rows in its rotary order (:func:`plan`, :func:`_encode`)."""
    import gguf

    if quant not in QUANTS:
        raise ExportError(f"--quant {quant!r}: GGUF quantizations are {', '.join(QUANTS)}")
    if i2s_layout not in I2S_LAYOUTS:
        raise ExportError(f"--i2s-layout {i2s_layout!r}: choose one of {', '.join(I2S_LAYOUTS)}")
    c = src.config
    arch = graph.arch
    rows = plan(src, quant, tq_fallback, i2s_layout, graph, embed_type, output_type)
    embed_rows = src.shape("model.embed_tokens.weight")[0]
    heads = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
    rope = c.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))

    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(name or src.path.name)
    w.add_file_type(_file_type(quant))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(int(c.get("max_position_embeddings", 2048)))
    w.add_embedding_length(int(c["hidden_size"]))
    w.add_block_count(int(c["num_hidden_layers"]))
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(c.get("num_key_value_heads") or heads))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-5)))
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(head_dim)
    if head_dim * heads != int(c["hidden_size"]):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(embed_rows)
    # not read by today's llama.cpp (its graph hardcodes SiLU); written so a runtime that reads it
    # can compute the right FFN, and so anyone can see what the model needs
    w.add_string(f"{arch}.hidden_activation", src.hidden_act)
    w.add_bool(f"{arch}.tie_word_embeddings", src.head_is_embedding())
    if graph.folds_scales:
        w.add_string("bitnet_train.weight_layout", "ternary weights as codes * absmean scale (no .scale tensors)")
    elif quant == "i2_s":
        w.add_string(
            "bitnet_train.weight_layout",
            f"I2_S codes, blocks of {I2S_LAYOUTS[i2s_layout]} ({i2s_layout} bitnet.cpp), embedded F32 scale (absmean)",
        )
    else:
        w.add_string("bitnet_train.weight_layout", "ternary codes + per-tensor F32 .scale (absmean)")
    pre = add_tokenizer(w, tokenizer, embed_rows, force=force)

    counts: dict[str, int] = {}
    for gname, key, kind, storage in rows:
        shape, dtype, nbytes, raw = _info(src, key, kind, storage)
        w.add_tensor_info(gname, shape, dtype, nbytes, raw_dtype=raw)
        if kind in ("ternary", "folded"):
            counts[storage] = counts.get(storage, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    scales: dict[str, float] = {}
    for i, (gname, key, kind, storage) in enumerate(rows):
        data = _encode(src, key, kind, storage, scales, i2s_layout, graph)
        w.write_tensor_data(data)
        del data
        if progress:
            progress(i + 1, len(rows), gname)
    w.close()
    stored = {kind: storage for _n, _k, kind, storage in rows if kind in ("embed", "head")}
    return {"tensors": len(rows), "ternary_storage": counts, "pre_tokenizer": pre, "i2s_layout": i2s_layout,
            "embed_type": stored.get("embed"), "output_type": stored.get("head")}
