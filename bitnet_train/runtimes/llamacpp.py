"""llama.cpp, through ``llama-cpp-python``: GGUFs of the architectures llama.cpp computes (ours: ``bitnet``
with a SiLU FFN and the tied head, TQ1_0 / TQ2_0 / F16 / F32).

llama.cpp's ``bitnet`` graph hardcodes a SiLU gated FFN and uses ``token_embd`` as the output matrix: a file
that says otherwise (``bitnet.hidden_activation``, an ``output.weight``) would run to finite, wrong logits,
so it is refused on opening (:meth:`LlamaCpp.refusal`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bitnet_train.runtimes.base import EngineError, Runtime, check_fits, default_threads, result
from bitnet_train.runtimes.gguf_header import chat_template, summary


class LlamaCpp(Runtime):
    """``n_ctx``: None for the model's own context (``<arch>.context_length``); ``all_logits``: keep the
    logits of every position (needed by :meth:`logits`; ``n_ctx`` x vocabulary floats); ``graph_check``:
    refuse a file llama.cpp would compute wrong (:meth:`refusal`; off only to measure how wrong)."""

    name = "llama.cpp"
    WHEEL = "llama-cpp-python"

    def __init__(self, path: str | Path, n_ctx: int | None = None, threads: int | None = None,
                 all_logits: bool = False, graph_check: bool = True):
        try:
            import llama_cpp
        except ImportError:
            raise EngineError(f"running a GGUF in llama.cpp needs {self.WHEEL}: pip install 'bitnet-train[llama]'") from None
        self.path, self.all_logits = Path(path), all_logits
        why = self.refusal(summary(self.path)) if graph_check else None
        if why:
            raise EngineError(f"{self.path}: {why}")
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx or 0, logits_all=all_logits,
                                       n_batch=min(n_ctx or 512, 512), n_threads=threads or default_threads(),
                                       verbose=False)
        except ValueError as e:
            raise EngineError(f"llama.cpp cannot load {self.path} (truncated, or not a model llama.cpp runs?): {e}") from None
        self.n_ctx, self.eos = int(self.llm.n_ctx()), int(self.llm.token_eos())
        arch = self.llm.metadata.get("general.architecture")
        self.n_ctx_train = int(self.llm.metadata.get(f"{arch}.context_length") or self.n_ctx)
        self.template, self.special = chat_template(
            self.llm.metadata.get, lambda i: self.llm.detokenize([i], special=True).decode("utf-8", errors="replace"))

    @staticmethod
    def refusal(head: dict) -> str | None:
        """Why llama.cpp would compute something other than the model in this file (None: it computes it)."""
        if head["arch"] != "bitnet":
            return None
        act = head["meta"].get("bitnet.hidden_activation", "silu")
        if act != "silu":
            return (f"architecture 'bitnet' with a {act} FFN; llama.cpp's 'bitnet' graph hardcodes SiLU and would "
                    "compute wrong (finite) logits. Export ReLU² models for ik_llama.cpp (arch bitnet-25) instead")
        if "output.weight" in head["tensors"]:
            return ("has an untied output.weight, which llama.cpp's 'bitnet' graph ignores (it multiplies by "
                    "token_embd)")
        return None

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def prefix_bytes(self, text: str, ids: list[int], k: int) -> int:
        return len(self.llm.detokenize(ids[:k]))

    def logits(self, ids: list[int]) -> np.ndarray:
        if not self.all_logits:
            raise EngineError("llama.cpp was opened without all_logits; logits of every position need it")
        if len(ids) > self.n_ctx:
            raise EngineError(f"{len(ids)} tokens do not fit the context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def complete(self, text: str, n: int, temperature: float, chat: bool) -> dict:
        llm = self.llm
        # raw text: BOS only if the GGUF asks; a rendered chat carries its own special tokens
        ids = self.tokenize(text, add_bos=not chat, special=True)
        check_fits(len(ids), self.n_ctx)
        n = min(n, self.n_ctx - len(ids))
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        out: list[int] = []
        for _ in range(n):
            tok = llm.sample(temp=temperature, top_k=0 if temperature > 0 else 1, top_p=1.0, min_p=0.0)
            if tok == self.eos:
                break
            out.append(tok)
            llm.eval([tok])
        t2 = time.perf_counter()
        return result(self.name, self.detokenize(out), len(ids), len(out), t1 - t0, t2 - t1, self.n_ctx)

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - no wheel for the platform, or its library fails to load
        return False
    return True


__all__ = ["LlamaCpp", "available"]


# ----------------------------------------------------------------------------------------------
# ggml's own quantizers (the types the gguf package cannot write, such as Q2_0)
# ----------------------------------------------------------------------------------------------

GGML_TYPE_Q2_0 = 42  # llama.cpp's ggml.h (llama-cpp-python 0.3.36): blocks of 64, fp16 scale, 2-bit codes
FILE_TYPE_Q2_0 = 41  # LLAMA_FTYPE_MOSTLY_Q2_0


def has_ggml_type(name: str) -> bool:
    """Whether the installed llama.cpp knows ``GGML_TYPE_<name>`` (Q2_0 arrived in llama-cpp-python 0.3.36)."""
    try:
        import llama_cpp
    except Exception:  # noqa: BLE001
        return False
    return hasattr(llama_cpp, f"GGML_TYPE_{name.upper()}")


_GGML = None


def _ggml_base():
    """libggml-base of the installed llama-cpp-python, with the quantizer's signature."""
    global _GGML
    if _GGML is None:
        import ctypes

        import llama_cpp

        libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("*ggml-base*"))
        if not libs:
            raise EngineError(f"{LlamaCpp.WHEEL} ships no ggml-base library here; cannot quantize")
        lib = ctypes.CDLL(str(libs[0]))
        f = lib.ggml_quantize_chunk
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_void_p]
        f.restype = ctypes.c_size_t
        r = lib.ggml_row_size
        r.argtypes, r.restype = [ctypes.c_int, ctypes.c_int64], ctypes.c_size_t
        _GGML = lib
    return _GGML


def ggml_row_bytes(ggml_type: int, n: int) -> int:
    """Bytes of one row of ``n`` values in ``ggml_type``."""
    return int(_ggml_base().ggml_row_size(ggml_type, n))


def ggml_quantize(arr: np.ndarray, ggml_type: int) -> np.ndarray:
    """``arr`` (``[..., n]`` float) quantized row by row by ggml's own quantizer, as uint8 bytes."""
    x = np.ascontiguousarray(arr, dtype=np.float32)
    n = x.shape[-1]
    rows = x.size // n
    out = np.empty(rows * ggml_row_bytes(ggml_type, n), dtype=np.uint8)
    got = _ggml_base().ggml_quantize_chunk(ggml_type, x.ctypes.data, out.ctypes.data, 0, rows, n, None)
    if got != out.size:
        raise EngineError(f"ggml_quantize_chunk wrote {got} bytes for type {ggml_type}, expected {out.size}")
    return out
