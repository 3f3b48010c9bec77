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

Shapes (:func:`shape_problems`, checked before anything is written): IQ1_BN and IQ2_BN quantize
activations to Q8_K64, which aborts the process (``GGML_ASSERT(k >= 8*QK_IQ1BN)``) for rows under
512 values; all three types pack blocks of 64.

Verification runs the file in ik_llama.cpp through its C API (``ik_llama_cpp._ctypes_api``), in a
child process so that an abort inside the runtime fails the export instead of killing it.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from .source import CheckpointSource, ExportError

ARCH = "bitnet-25"
ARCHS = ("bitnet-25", "bitnet-b1.58")  # the architectures ik_llama.cpp runs with its ReLU² graph
QUANTS = ("iq2_bn", "iq2_bn_r4", "iq1_bn", "f16", "f32")
# our name -> (ggml type id, llama-quantize's name); the ids are ik_llama.cpp's ggml.h
IK_TYPES = {"iq1_bn": (134, "IQ1_BN"), "iq2_bn": (135, "IQ2_BN"), "iq2_bn_r4": (335, "IQ2_BN_R4")}
IK_BLOCK = 64  # QK_IQ1BN: values per block of IQ1_BN / IQ2_BN / IQ2_BN_R4
IK_MIN_ROW = 512  # 8 * QK_IQ1BN: IQ1_BN / IQ2_BN activations (Q8_K64) need rows of at least this
R4_ROWS = 4  # IQ2_BN_R4 interleaves groups of 4 rows
WHEEL = "ik-llama-cpp-python"


def available() -> bool:
    try:
        import ik_llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - no wheel for the platform, or its library fails to load
        return False
    return True


def _need() -> None:
    if not available():
        raise ExportError(f"ik_llama.cpp is not installed: pip install '{WHEEL}>=0.1.5' (or 'bitnet-train[ik]')")


# ----------------------------------------------------------------------------------------------
# what the model is vs what ik's graph computes
# ----------------------------------------------------------------------------------------------


def mismatches(src: CheckpointSource) -> list[str]:
    """Ways ik_llama.cpp's ``bitnet-25`` graph would compute something other than this model."""
    c = src.config
    out = []
    if c.get("model_type") != "bitnet":
        out.append(f"model_type is {c.get('model_type')!r}; ik_llama.cpp's '{ARCH}' graph is BitNet's")
    if src.hidden_act != "relu2":
        out.append(
            f"hidden_act is {src.hidden_act!r}; ik_llama.cpp's '{ARCH}' graph computes a ReLU² gated FFN "
            "(SiLU models export to llama.cpp: --quant tq2_0, tq1_0, f16 or f32)"
        )
    if src.qc.get("use_rms_norm"):
        out.append("the BitLinear layers have an input RMSNorm (use_rms_norm), which ik_llama.cpp's graph lacks")
    if c.get("attention_bias") or c.get("mlp_bias"):
        out.append("the model has biases, which ik_llama.cpp's bitnet graph lacks")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        out.append(f"rope_type is {rope.get('rope_type')!r}; only default RoPE is exported")
    mods = {m.rsplit(".", 1)[-1] for m in src.ternary_modules}
    want = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    if mods != want:
        out.append(f"the ternary layers are {sorted(mods)}; the '{ARCH}' graph expects exactly {sorted(want)} ternary")
    return out


def shape_problems(src: CheckpointSource, quant: str) -> list[str]:
    """Every ternary tensor ik_llama.cpp cannot take in ``quant``, with the rule it breaks."""
    if quant not in IK_TYPES:
        return []
    out = []
    for key in src.keys():
        if not src.is_ternary(key):
            continue
        rows, k = src.shape(key)[0], src.shape(key)[-1]
        name = quant.upper()
        if k % IK_BLOCK:
            out.append(f"tensor {key!r} has rows of {k} values, not a multiple of {IK_BLOCK} ({name} packs blocks "
                       f"of {IK_BLOCK})")
        elif quant != "iq2_bn_r4" and k < IK_MIN_ROW:
            out.append(f"tensor {key!r} has rows of {k} values; {name} needs at least {IK_MIN_ROW} (ik_llama.cpp "
                       f"quantizes its activations to Q8_K64, which aborts on rows under {IK_MIN_ROW})")
        if quant == "iq2_bn_r4" and rows % R4_ROWS:
            out.append(f"tensor {key!r} has {rows} rows, not a multiple of {R4_ROWS} (IQ2_BN_R4 interleaves "
                       f"{R4_ROWS} rows)")
    return out


# ----------------------------------------------------------------------------------------------
# the writer
# ----------------------------------------------------------------------------------------------


def quantize_bin() -> Path:
    _need()
    from ik_llama_cpp import find_quantize_bin

    exe = find_quantize_bin()
    if exe is None:
        raise ExportError(f"{WHEEL} is installed without its llama-quantize binary; reinstall it")
    return Path(exe)


def write_ik(src: CheckpointSource, out: Path, quant: str, tokenizer, force: bool = False, progress=None,
             threads: int | None = None) -> dict:
    """Write ``src`` as an ik_llama.cpp GGUF at ``out`` (the caller makes it atomic)."""
    from .gguf import write_gguf

    if quant not in QUANTS:
        raise ExportError(f"--quant {quant!r}: ik_llama.cpp formats are {', '.join(QUANTS)}")
    problems = shape_problems(src, quant)
    if problems:
        raise ExportError(f"ik_llama.cpp cannot run this model as {quant.upper()}: " + "; ".join(problems))
    if quant in ("f16", "f32"):
        r = write_gguf(src, out, quant, tokenizer, force=force, progress=progress, arch=ARCH, fold_scales=True)
        return {**r, "arch": ARCH}
    exe = quantize_bin()  # before the F32 file is written: fail early
    f32 = out.with_name(out.name + "-f32")  # inside the caller's temporary name, so leftovers are tidied
    try:
        r = write_gguf(src, f32, "f32", tokenizer, force=force, progress=progress, arch=ARCH, fold_scales=True)
        # token_embd (and an untied output.weight) F16 as in our other GGUFs; the rest of the
        # non-ternary tensors are 1-D norms, which llama-quantize leaves F32
        cmd = [str(exe), "--pure", "--token-embedding-type", "f16", "--output-tensor-type", "f16",
               str(f32), str(out), IK_TYPES[quant][1], str(threads or max(1, min(os.cpu_count() or 1, 8)))]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0 or not out.is_file():
            raise ExportError(f"ik_llama.cpp's llama-quantize failed (exit {p.returncode}) making {quant.upper()}: "
                              f"{(p.stderr or p.stdout).strip()[-1500:]}")
    finally:
        f32.unlink(missing_ok=True)
    types = {name: t for name, _dims, t in read_header(out)[1]}
    want = IK_TYPES[quant][0]
    wrong = [n for n, k in _ternary_names(src) if types.get(n) != want]
    if wrong:
        raise ExportError(f"llama-quantize did not store {wrong[:3]} as {quant.upper()} (types {[types.get(n) for n in wrong[:3]]})")
    r["ternary_storage"] = {quant: len(_ternary_names(src))}
    return {**r, "arch": ARCH}


def _ternary_names(src: CheckpointSource) -> list[tuple[str, str]]:
    from .gguf import gguf_name

    return [(gguf_name(k), k) for k in src.keys() if src.is_ternary(k)]


# ----------------------------------------------------------------------------------------------
# reading a GGUF's header (the gguf package's reader stops at ik's type ids)
# ----------------------------------------------------------------------------------------------


def read_header(path: str | Path, keys=None) -> tuple[dict, list[tuple[str, tuple[int, ...], int]]]:
    """(metadata {key: value}, [(tensor name, dims, ggml type id)]) of a GGUF, parsed by the gguf
    package's reader with its tensor-data step skipped (that step needs every type id to be one
    the package knows; ik's 134/135/335 and bitnet.cpp's 36 are not). ``keys``: convert only these
    metadata keys (the token and merge lists of a big vocabulary take seconds)."""
    import gguf

    class _Header(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):  # noqa: ANN001 - gguf's signature
            self.tensor_infos = [
                (str(bytes(f.parts[1]), encoding="utf-8"), tuple(int(d) for d in f.parts[3]), int(f.parts[4][0]))
                for f in fields
            ]

    try:
        r = _Header(str(path))
    except (ValueError, OSError) as e:
        raise ExportError(f"{path}: not a readable GGUF file: {e}") from None
    meta = {}
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or not f.types or (keys is not None and key not in keys):
            continue
        try:
            meta[key] = f.contents()
        except Exception:  # noqa: BLE001 - a field type this version cannot render
            continue
    return meta, r.tensor_infos


def is_ik_file(path: str | Path) -> bool:
    """True when ik_llama.cpp, and only it, runs this GGUF: its architecture is ``bitnet-25`` /
    ``bitnet-b1.58`` or it holds ik's ternary types (a ``bitnet-b1.58`` file holding bitnet.cpp's
    I2_S is Microsoft's, which bitnet.cpp runs: that one is not ik's)."""
    meta, tensors = read_header(path)
    types = {t for _n, _d, t in tensors}
    if types & {t for t, _ in IK_TYPES.values()}:
        return True
    from .gguf import I2S_TYPE

    return meta.get("general.architecture") in ARCHS and I2S_TYPE not in types


# ----------------------------------------------------------------------------------------------
# the runtime (ctypes, in this process)
# ----------------------------------------------------------------------------------------------

_LOG_CB = None  # keep the ctypes callback alive


def _quiet_logs(C) -> None:
    """Route ik_llama.cpp's log lines nowhere (errors still reach us as return codes)."""
    global _LOG_CB
    if _LOG_CB is not None:
        return
    proto = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
    _LOG_CB = proto(lambda _level, _text, _data: None)
    fn = C._lib.llama_log_set
    fn.argtypes, fn.restype = [proto, ctypes.c_void_p], None
    fn(_LOG_CB, None)


class IkRuntime:
    """One model and context of ik_llama.cpp, through ``ik_llama_cpp._ctypes_api``.

    ``n_ctx`` defaults to the model's context length (``<arch>.context_length``)."""

    def __init__(self, path: str | Path, n_ctx: int | None = None, threads: int | None = None,
                 logits_all: bool = False, verbose: bool = False):
        _need()
        from ik_llama_cpp import _ctypes_api as C

        self.C = C
        if not verbose:
            _quiet_logs(C)
        C.llama_backend_init()
        mp = C.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.fit = False  # its memory-fit probe sees 0 MiB free on a CPU-only machine and refuses the model
        self.model = C.llama_model_load_from_file(str(path).encode("utf-8"), mp)
        if not self.model:
            raise ExportError(f"ik_llama.cpp could not load {path}")
        self.n_ctx_train = int(_fn(C, "llama_n_ctx_train", [ctypes.c_void_p], ctypes.c_int32)(self.model))
        self.n_ctx = int(n_ctx or self.n_ctx_train or 2048)
        cp = C.llama_context_default_params()
        cp.n_ctx = self.n_ctx
        cp.n_batch = cp.n_ubatch = min(self.n_ctx, 512)
        n = int(threads or max(1, min(os.cpu_count() or 1, 8)))
        cp.n_threads = cp.n_threads_batch = n
        cp.logits_all = logits_all
        cp.flash_attn = False  # the wheel's own wrapper turns it off without AVX-VNNI (asserts); plain attention everywhere
        self.ctx = C.llama_init_from_model(self.model, cp)
        if not self.ctx:
            C.llama_free_model(self.model)
            raise ExportError(f"ik_llama.cpp could not create a context of {self.n_ctx} tokens for {path}")
        self.n_batch = int(cp.n_batch)
        self.n_vocab = int(_fn(C, "llama_n_vocab", [ctypes.c_void_p], ctypes.c_int32)(self.model))
        self.pos = 0

    # -- metadata and tokens --------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        f = _fn(self.C, "llama_model_meta_val_str", [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t],
                ctypes.c_int32)
        size = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = f(self.model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n + 1

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        C = self.C
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (C.llama_token * cap)()
        n = C.llama_tokenize(self.model, data, len(data), buf, cap, add_bos, special)  # ik takes the model
        if n < 0:
            cap = -n
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self.model, data, len(data), buf, cap, add_bos, special)
        return list(buf[:n])

    def detokenize(self, ids: list[int]) -> str:
        out = bytearray()
        buf = ctypes.create_string_buffer(256)
        for t in ids:
            n = self.C.llama_token_to_piece(self.model, int(t), buf, 256, 0, False)
            if n > 0:
                out += buf.raw[:n]
        return out.decode("utf-8", errors="replace")

    def detokenize_special(self, tok: int) -> str:
        """The text of one token, special tokens included (``<|end_of_text|>``)."""
        buf = ctypes.create_string_buffer(256)
        n = self.C.llama_token_to_piece(self.model, int(tok), buf, 256, 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def is_eog(self, tok: int) -> bool:
        return bool(self.C.llama_token_is_eog(self.model, int(tok)))

    # -- evaluation -----------------------------------------------------------------------------
    def reset(self) -> None:
        self.C.llama_kv_cache_clear(self.ctx)
        self.pos = 0

    def eval(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        """Feed ``ids`` after what was fed before; the logits of every position (``all_logits``)
        or of the last one, as float32 ``[n, vocab]``."""
        C = self.C
        if self.pos + len(ids) > self.n_ctx:
            raise ExportError(f"{self.pos + len(ids)} tokens do not fit the context of {self.n_ctx}")
        rows = []
        for i in range(0, len(ids), self.n_batch):
            chunk = ids[i : i + self.n_batch]
            last = i + len(chunk) == len(ids)
            batch = C.llama_batch_init(len(chunk), 0, 1)
            try:
                batch.n_tokens = len(chunk)
                for j, t in enumerate(chunk):
                    batch.token[j] = int(t)
                    batch.pos[j] = self.pos + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = 1 if all_logits or (last and j == len(chunk) - 1) else 0
                rc = C.llama_decode(self.ctx, batch)
            finally:
                C.llama_batch_free(batch)
            if rc != 0:
                raise ExportError(f"ik_llama.cpp's llama_decode failed (code {rc})")
            self.pos += len(chunk)
            want = range(len(chunk)) if all_logits else ([len(chunk) - 1] if last else [])
            for j in want:
                p = C.llama_get_logits_ith(self.ctx, j)
                rows.append(np.ctypeslib.as_array(p, shape=(self.n_vocab,)).copy())
        return np.stack(rows).astype(np.float32)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.C.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.C.llama_free_model(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _fn(C, name, argtypes, restype):
    f = getattr(C._lib, name)
    f.argtypes, f.restype = argtypes, restype
    return f


# ----------------------------------------------------------------------------------------------
# verification: logits in a child process
# ----------------------------------------------------------------------------------------------


def ik_logits(path: str | Path, ids: list[int], text: str | None = None, tokenizer=None,
              threads: int | None = None, timeout: float = 1800) -> tuple[np.ndarray, str]:
    """ik_llama.cpp's logits for ``ids`` (every position, one context) and whether it tokenizes
    ``text`` as ``tokenizer`` does. Runs in a child process: an abort inside the runtime (a
    ``GGML_ASSERT``) becomes an error here."""
    import tempfile

    from .verify import _same_tokens

    _need()
    with tempfile.TemporaryDirectory() as d:
        job = Path(d) / "job.json"
        outf = Path(d) / "logits.npy"
        job.write_text(json.dumps({"path": str(path), "ids": [int(i) for i in ids], "text": text,
                                   "threads": threads, "out": str(outf)}))
        r = subprocess.run([sys.executable, "-m", "bitnet_train.export.ik", str(job)], capture_output=True,
                           text=True, timeout=timeout)
        if r.returncode != 0:
            said = [ln for ln in r.stderr.splitlines() if "GGML_ASSERT" in ln or "error" in ln.lower()]
            raise ExportError(f"ik_llama.cpp failed on {path} (exit {r.returncode}): "
                              + ("; ".join(said[:3]) or r.stderr.strip()[-1500:]))
        logits = np.load(outf)
        theirs = json.loads(r.stdout.strip().splitlines()[-1])["tokens"]
    tokenization = "not checked"
    if text is not None and tokenizer is not None:
        tokenization = _same_tokens(list(tokenizer(text)["input_ids"]), theirs)
    return logits, tokenization


def _child(job_file: str) -> int:
    job = json.loads(Path(job_file).read_text())
    ids = job["ids"]
    with IkRuntime(job["path"], n_ctx=max(64, len(ids) + 8), threads=job["threads"], logits_all=True) as rt:
        np.save(job["out"], rt.eval(ids, all_logits=True))
        # the GGUF's own special-token policy: BOS only when the file says so
        toks = rt.tokenize(job["text"], add_bos=True, special=False) if job["text"] is not None else None
    print(json.dumps({"tokens": toks}))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
