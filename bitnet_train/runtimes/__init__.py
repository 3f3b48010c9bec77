"""The engines that run a model, one class each, with the same methods (:class:`~.base.Runtime`):

========================  =====================================================================
``bitnet-train``          :class:`~.torch_model.OurForward`: a checkpoint through our BitLinear forward
``transformers``          :class:`~.torch_model.StockTransformers`: a directory in stock transformers
``llama.cpp``             :class:`~.llamacpp.LlamaCpp`: a GGUF through llama-cpp-python
``ik_llama.cpp``          :class:`~.ikllama.IkLlama`: a GGUF through ik-llama-cpp-python's C API
``bitnet.cpp``            :class:`~.bitnetcpp.BitnetCpp`: an I2_S GGUF in a bitnet.cpp build
========================  =====================================================================

Export verification, ``eval`` and ``generate`` all open models here: :func:`engine_for` says which engine
computes a path (from a GGUF's header, or a directory's ``quantization_config``), :func:`open_model` opens
it. Adding a runtime is one class and one entry of :data:`ENGINES`.
"""

from __future__ import annotations

from pathlib import Path

from bitnet_train.errors import UserError
from bitnet_train.runtimes.base import EngineError, Runtime
from bitnet_train.runtimes.bitnetcpp import FILE_TYPE_I2_S, GGML_TYPE_I2_S, BitnetCpp
from bitnet_train.runtimes.ikllama import ARCHS as IK_ARCHS
from bitnet_train.runtimes.ikllama import GGML_TYPES as IK_TYPES
from bitnet_train.runtimes.ikllama import IkLlama
from bitnet_train.runtimes.llamacpp import LlamaCpp
from bitnet_train.runtimes.torch_model import OurForward, StockTransformers, is_packed

ENGINES: dict[str, type[Runtime]] = {
    "bitnet-train": OurForward,
    "transformers": StockTransformers,
    "llama.cpp": LlamaCpp,
    "ik_llama.cpp": IkLlama,
    "bitnet.cpp": BitnetCpp,
}


def gguf_engine(head: dict) -> str:
    """The engine that computes a GGUF, from its :func:`~.gguf_header.summary`: ik's ternary types or
    architectures → ik_llama.cpp (a ``bitnet-b1.58`` file holding I2_S is Microsoft's, bitnet.cpp's),
    I2_S → bitnet.cpp, anything else → llama.cpp."""
    if head["types"] & {t for t, _ in IK_TYPES.values()}:
        return "ik_llama.cpp"
    if GGML_TYPE_I2_S in head["types"] or head["file_type"] == FILE_TYPE_I2_S:
        return "bitnet.cpp"
    if head["arch"] in IK_ARCHS:
        return "ik_llama.cpp"
    return "llama.cpp"


def engine_for(model: str | Path) -> str:
    """The engine that computes ``model``: a ``.gguf`` by its header (:func:`gguf_engine`), a packed
    ``export --format hf`` directory in stock transformers, a checkpoint directory in our forward."""
    from bitnet_train.runtimes.gguf_header import summary

    p = Path(model)
    if p.is_file() and p.suffix == ".gguf":
        return gguf_engine(summary(p))
    if p.is_dir():
        return "transformers" if is_packed(p) else "bitnet-train"
    if not p.exists():
        raise UserError(f"{model}: no such file or directory")
    raise UserError(f"{model}: not a checkpoint directory, an export --format hf directory or a .gguf file")


def open_model(model: str | Path, *, engine: str | None = None, n_ctx: int | None = None,
               threads: int | None = None, all_logits: bool = False, device: str = "cpu", batch_size: int = 8,
               bitnet_cpp: str | Path | None = None, backend: str = "auto", graph_check: bool = True) -> Runtime:
    """Open ``model`` in ``engine`` (default :func:`engine_for`). GGUF engines: ``n_ctx`` (None: the
    model's own context), ``threads``, ``all_logits`` (keep every position's logits); torch ones:
    ``device``, ``batch_size`` (windows per forward in ``nll``), ``backend`` (BitLinear's, ours only);
    bitnet.cpp: ``bitnet_cpp``, the build (default ``$BITNET_CPP_DIR``); llama.cpp: ``graph_check``
    (:meth:`~.llamacpp.LlamaCpp.refusal`)."""
    engine = engine or engine_for(model)
    if engine not in ENGINES:
        raise UserError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "bitnet-train":
        return OurForward(model, device=device, batch_size=batch_size, threads=threads, backend=backend)
    if engine == "transformers":
        return StockTransformers(model, device=device, batch_size=batch_size, threads=threads)
    if engine == "bitnet.cpp":
        return BitnetCpp(model, root=bitnet_cpp, threads=threads, n_ctx=n_ctx, all_logits=all_logits)
    if engine == "llama.cpp":
        return LlamaCpp(model, n_ctx=n_ctx, threads=threads, all_logits=all_logits, graph_check=graph_check)
    return ENGINES[engine](model, n_ctx=n_ctx, threads=threads, all_logits=all_logits)


__all__ = ["ENGINES", "BitnetCpp", "EngineError", "IkLlama", "LlamaCpp", "OurForward", "Runtime", "StockTransformers",
           "engine_for", "gguf_engine", "open_model"]
