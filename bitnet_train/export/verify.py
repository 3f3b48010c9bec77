"""Verification of an export: the runtime's logits against our model's, on a probe text.

Our side: the checkpoint in :class:`~bitnet_train.runtimes.torch_model.OurForward` (BitLinear, ``torch``
backend, fp32) — the forward the trainer ran. Runtime side: the format's runtime
(:attr:`~.formats.Format.runtime`, opened through :mod:`bitnet_train.runtimes`), fed the same token ids, so
a tokenizer difference cannot hide a weight error; whether the runtime tokenizes the probe text as our
tokenizer does is checked separately.

Metrics over all probe positions: relative error ``||runtime - ours|| / ||ours||`` of the logits and top-1
agreement (share of positions whose argmax token is the same, over the *decisive* ones: where our top logit
leads the runner-up by more than :data:`TIE_FACTOR` times the error the format's tolerance allows in that
row, ``max_rel * ||ours_row|| / sqrt(vocab)``; among near ties any error within the tolerance may pick
another token — a barely trained student with nearly flat distributions has many), against the format's
:class:`~.formats.Tolerance` (measured figures in :mod:`.formats`), and where the format has an emulation of
its runtime's arithmetic (:func:`emulated_logits`) against that too.

The GGUF runtimes quantize activations their own way (none for F16/F32, blocks of 32, 256 or 64-value lanes)
where the trainer quantizes them per token to int8, and a model can be sensitive to that: a converted
SmolLM2-135M after 30 steps of QAT (30 layers) moves its logits by 3.6e-2 (plain QAT) and 1.4e-1 (SubLN +
distillation) when our own forward merely takes float activations, against 1e-3 to 3e-2 for the small models
the fixed tolerances were measured on; correct files of it land at 1.0x to 1.2x that, a file with q/k rows
not permuted at 3.9x, one without its scales at 9x to 29x. So each export also measures that
**sensitivity** (our model with float activations against ours, :attr:`Agreement.sensitivity`); where
:data:`SENSITIVITY_FACTOR` times it exceeds the format's tolerance, that product is the tolerance instead,
and the top-1 floor and the emulation's tolerance, calibrated on insensitive models, are reported rather than
gated. Formats whose runtime quantizes activations as we do (``hf``, bitnet.cpp's I2_S) take no such
allowance. How far the runtime's arithmetic moves the model's quality is measured by held-out bits per byte
(``bitnet-train eval`` on the file and on the checkpoint; ``scripts/bench_converted.py``). Reported beside them, not a gate: the
probe's perplexity in both, ``exp(mean NLL)`` of its tokens ``ids[1:]`` from each side's own logits
(float64 log-softmax, :func:`bitnet_train.runtimes.nll.window_nll`, as ``bitnet-train eval`` sums it).

A ReLU² model in llama.cpp or a ternary export with its scales dropped is far outside the tolerances
(tested) — on a model whose layers matter: on a barely trained one (40 steps of the test model) the logits
are mostly the embedding's unigram guess, and a TQ2_0 file with every scale dropped measured 3.5e-2, inside
the TQ tolerance (200 steps: 1.1e-1, caught).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitnet_train.export.formats import Format
from bitnet_train.errors import ExportError

DEFAULT_PROBE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n"
)


SENSITIVITY_FACTOR = 2.0  # the runtime may move the logits this many times what float activations do


@dataclass
class Agreement:
    fmt: str
    rel_error: float
    top1: float
    positions: int
    max_rel: float
    min_top1: float
    tokenization: str = "not checked"
    emulated_rel: float | None = None
    max_emulated_rel: float | None = None
    ppl_ours: float | None = None
    ppl_runtime: float | None = None
    sensitivity: float | None = None  # rel. error of our model with float activations against ours
    decisive: int | None = None  # probe positions top1 is over (the rest are near ties); None: all

    @property
    def ppl_rel(self) -> float | None:
        """|runtime's probe perplexity / ours - 1|."""
        if self.ppl_ours is None or self.ppl_runtime is None:
            return None
        return abs(self.ppl_runtime / self.ppl_ours - 1.0)

    def as_dict(self) -> dict:
        """The figures as JSON values (``export --json``)."""
        from dataclasses import asdict

        return {**asdict(self), "ppl_rel": self.ppl_rel, "allowed_rel": self.allowed_rel, "sensitive": self.sensitive,
                "ok": self.ok}

    @property
    def sensitive(self) -> bool:
        """Whether the model's own sensitivity to its activation arithmetic exceeds the format's tolerance:
        :data:`SENSITIVITY_FACTOR` times what replacing our per-token int8 activations by float ones does
        to its logits is more than ``max_rel``."""
        return self.sensitivity is not None and SENSITIVITY_FACTOR * self.sensitivity > self.max_rel

    @property
    def allowed_rel(self) -> float:
        """The largest relative logit error that passes: the format's, or for a :attr:`sensitive` model
        :data:`SENSITIVITY_FACTOR` times its sensitivity."""
        return SENSITIVITY_FACTOR * self.sensitivity if self.sensitive else self.max_rel

    @property
    def ok(self) -> bool:
        """The runtime tokenizes the probe as we do and its logits are within :attr:`allowed_rel` of our
        forward's; for a model that is not :attr:`sensitive`, also the format's top-1 floor and, where the
        format has an emulation of its runtime's arithmetic, the tolerance against it."""
        if not (np.isfinite(self.rel_error) and self.rel_error <= self.allowed_rel):
            return False
        if not self.sensitive:
            if self.top1 < self.min_top1:  # NaN (no decisive position) passes
                return False
            if self.max_emulated_rel is not None and not (
                    self.emulated_rel is not None and self.emulated_rel <= self.max_emulated_rel):
                return False
        return not self.tokenization.startswith("DIFFERS")

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        if self.sensitive:
            tol = (f"tolerance {self.allowed_rel:.1e}: {SENSITIVITY_FACTOR:g} x {self.sensitivity:.2e}, what float "
                   f"activations alone move this model's logits, above the format's {self.max_rel:.0e}")
        else:
            tol = f"tolerance {self.max_rel:.0e}"
        s = f"verify [{self.fmt}] {verdict}: relative logit error {self.rel_error:.3e} ({tol}), top-1 agreement "
        s += "- " if np.isnan(self.top1) else f"{self.top1:.1%}"
        s += " (reported)" if self.sensitive else f" (tolerance {self.min_top1:.0%})"
        if self.decisive is None or self.decisive == self.positions:
            s += f" over {self.positions} positions"
        else:
            s += f" over the {self.decisive} of {self.positions} positions not near a tie"
        if self.max_emulated_rel is not None:
            s += f"; vs our model with {self.fmt}'s arithmetic emulated {self.emulated_rel:.3e} "
            s += "(reported)" if self.sensitive else f"(tolerance {self.max_emulated_rel:.0e})"
        if self.ppl_rel is not None:
            s += (f"; probe perplexity ours {self.ppl_ours:.4f}, runtime {self.ppl_runtime:.4f} "
                  f"(relative difference {self.ppl_rel:.2e})")
        return s + f"; tokenization: {self.tokenization}"


TIE_FACTOR = 4.0  # a position is decisive when our top-2 margin exceeds this many allowed row errors


def decisive_positions(ours: np.ndarray, max_rel: float) -> np.ndarray:
    """Positions (a boolean per row of ``ours``, ``[positions, vocab]``) where our top logit leads the
    runner-up by more than :data:`TIE_FACTOR` times ``max_rel * ||row|| / sqrt(vocab)``, the root-mean-square
    error per logit that a relative error of ``max_rel`` spread evenly allows there."""
    ours = np.asarray(ours, dtype=np.float64)
    top2 = np.partition(ours, -2, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    allowed = max_rel * np.linalg.norm(ours, axis=-1) / np.sqrt(ours.shape[-1])
    return margin > TIE_FACTOR * allowed


def rel_error(runtime: np.ndarray, ours: np.ndarray) -> float:
    runtime = np.asarray(runtime, dtype=np.float64)
    ours = np.asarray(ours, dtype=np.float64)
    if runtime.shape != ours.shape:
        raise ValueError(f"logit shapes differ: runtime {runtime.shape} vs ours {ours.shape}")
    return float(np.linalg.norm(runtime - ours) / max(np.linalg.norm(ours), 1e-30))


def probe_perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp(mean NLL) of ``ids[1:]`` from ``logits`` ``[len(ids), vocab]`` of the model fed ``ids``
    (position i predicts token i + 1; the last position predicts nothing here)."""
    from bitnet_train.runtimes.nll import window_nll

    logits = np.asarray(logits)
    if len(ids) < 2 or logits.shape[0] != len(ids):
        raise ValueError(f"probe perplexity: {logits.shape[0]} logit rows for {len(ids)} tokens")
    n = len(ids) - 1
    return float(np.exp(window_nll(logits[:n], list(ids), n) / n))


def compare(
    fmt: Format, runtime: np.ndarray, ours: np.ndarray, tokenization: str = "not checked",
    ours_emulated: np.ndarray | None = None, ids: list[int] | None = None, ours_float: np.ndarray | None = None,
) -> Agreement:
    """``ours``: the trainer's forward; ``ours_emulated``: :func:`emulated_logits` with ``fmt.emulate``
    (needed for the formats that have an emulation tolerance); ``ids``: the probe tokens both were fed,
    for the probe perplexity of each; ``ours_float``: our model with float activations (``emulated_logits``
    ``f32``), for the model's sensitivity (:attr:`Agreement.sensitive`)."""
    rel = rel_error(runtime, ours)
    t = fmt.tolerance
    keep = decisive_positions(ours, t.max_rel)
    agree = np.asarray(runtime).argmax(-1) == np.asarray(ours).argmax(-1)
    top1 = float(np.mean(agree[keep])) if keep.any() else float("nan")
    w = rel_error(runtime, ours_emulated) if ours_emulated is not None else None
    ppl = (probe_perplexity(ours, ids), probe_perplexity(runtime, ids)) if ids is not None else (None, None)
    sens = rel_error(ours_float, ours) if ours_float is not None else None
    return Agreement(fmt.key, rel, top1, int(np.asarray(ours).shape[0]), t.max_rel, t.min_top1, tokenization, w,
                     t.max_emulated, *ppl, sens, int(keep.sum()))


def probe_ids(tokenizer, text: str, max_tokens: int = 128) -> list[int]:
    """The probe as the tokenizer encodes it for the model (its own BOS/EOS policy)."""
    ids = tokenizer(text)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise ValueError("the probe text is too short: it gives fewer than 2 tokens")
    return [int(i) for i in ids]


def our_logits(checkpoint: str | Path, ids: list[int]) -> np.ndarray:
    """Logits of the trainer's forward (BitLinear, torch backend, fp32)."""
    from bitnet_train.runtimes import OurForward

    with OurForward(checkpoint, backend="torch") as rt:
        return rt.logits(ids)


def _q8_0(x):
    """ggml's Q8_0 round trip of the last dimension in blocks of 32 (``quantize_row_q8_0``): scale
    ``amax / 127`` stored fp16, codes ``round(x / scale)``; what llama.cpp does to the activations of a
    Q2_0 product. Widths not divisible by 32 are left as they are."""
    import torch

    k = x.shape[-1]
    if k % 32:
        return x
    b = x.reshape(*x.shape[:-1], k // 32, 32)
    d = b.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(b * inv) * d.half().float()).reshape(x.shape)


def _q8_k(x):
    """ggml's Q8_K round trip of the last dimension in blocks of 256 (``quantize_row_q8_K_ref``): the
    value of largest magnitude ``m`` (with its sign) maps to -127, scale ``-m / 127`` kept in fp32, codes
    ``min(127, round(x * -127 / m))``; what llama.cpp does to the input of a K-quant product (the head in
    Q6_K). Widths not divisible by 256 are left as they are."""
    import torch

    k = x.shape[-1]
    if k % 256:
        return x
    b = x.reshape(*x.shape[:-1], k // 256, 256)
    m = torch.gather(b, -1, b.abs().argmax(-1, keepdim=True))
    iscale = torch.where(m != 0, -127.0 / m, torch.zeros_like(m))
    q = torch.clamp(torch.round(b * iscale), max=127)
    d = torch.where(m != 0, 1.0 / iscale, torch.zeros_like(m))
    return (q * d).reshape(x.shape)


def _q8_k64(x):
    """ik_llama.cpp's Q8_K64 round trip of the last dimension (``quantize_row_q8_K64_ref``), what it does to
    the activations of an IQ1_BN / IQ2_BN product: four scales per row, one per interleaved lane (value ``j``
    of the row is in lane ``(j % 16) // 4``), each ``amax / 127`` of its lane over the whole row; codes
    ``round(x / scale)``. Widths not divisible by 16 are left as they are."""
    import torch

    k = x.shape[-1]
    if k % 16:
        return x
    b = x.reshape(*x.shape[:-1], k // 16, 4, 4)
    d = b.abs().amax(dim=(-3, -1), keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(b * inv) * d).reshape(x.shape)


def stored_embedding(weight, embed_type: str):
    """``weight`` as the runtime reads it back from ``embed_type`` (:data:`~.formats.EMBED_TYPES`): fp16
    rounding, or ggml's own quantizer and the gguf package's dequantizer for the block types."""
    import torch

    from bitnet_train.export.formats import EMBED_TYPES

    t = EMBED_TYPES[embed_type]
    if embed_type == "f32":
        return weight
    if embed_type == "f16":
        return weight.half().float()
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from bitnet_train.runtimes.llamacpp import ggml_quantize

    w = weight.float().numpy()
    back = dequantize(ggml_quantize(w, t.ggml_type).reshape(w.shape[0], -1), GGMLQuantizationType(t.ggml_type))
    return torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32)).reshape(weight.shape)


EMULATIONS = ("f32", "f16", "q2_0", "q8_k64")
_HEAD_INPUT = {None: None, "f16": lambda x: x.half().float(), "q8_0": _q8_0, "q8_k": _q8_k}


def emulated_logits(checkpoint: str | Path, ids: list[int], emulate: str, embed_type: str | None = None,
                    output_type: str | None = None) -> np.ndarray:
    """Our model and ternary weights with a runtime's arithmetic for a GGUF instead of our per-token int8
    activations — ``f32``: weights ``codes * scale``, no activation quantization; ``f16``: activations
    rounded to fp16; ``q2_0``: weights ``codes * fp16(scale)`` (the block scale Q2_0 stores) and activations
    through Q8_0 blocks of 32 (llama.cpp's ``vec_dot_q2_0_q8_0``). The embedding as the file stores it
    (``embed_type``, default F32 for ``f32`` and F16 otherwise; an untied head in ``output_type``, default
    the embedding's: :func:`stored_embedding`), and the head's input as the runtime quantizes it for that
    type (fp16, Q8_0, or Q8_K for Q6_K). The difference to the runtime is then float summation order (and
    the fp16 KV cache), so a small tolerance catches any error in the exported weights or their order. TQ
    formats are not emulated: quantizing activations in 256-wide int8 blocks (Q8_K) here left a 2e-2
    residual on a random-initialised model, so the arithmetic of llama.cpp's TQ path is not reproduced
    exactly."""
    import torch

    from bitnet_train.export.formats import EMBED_TYPES

    from bitnet_train.layers.bitlinear import bitlinear_modules
    from bitnet_train.quant import weight_quant
    from bitnet_train.runtimes import OurForward

    if emulate not in EMULATIONS:
        raise ValueError(f"no emulation of a runtime's {emulate!r} arithmetic")

    def f16(x):
        return x.half().float()

    act = {"f32": None, "f16": f16, "q2_0": _q8_0, "q8_k64": _q8_k64}[emulate]
    embed_type = embed_type or ("f32" if emulate == "f32" else "f16")
    output_type = output_type or embed_type
    with OurForward(checkpoint, backend="torch") as rt:
        model = rt.model
        with torch.no_grad():
            for _, m in bitlinear_modules(model):
                codes, s = weight_quant(m.weight.float())
                scale = s.half().float() if emulate == "q2_0" else s
                m.weight.copy_((codes.float() * scale).to(m.weight.dtype))
                m.quant_lambda = 0.0  # plain F.linear on the already ternary weights
                if act is not None:
                    m.register_forward_pre_hook(lambda _m, a, act=act: (act(a[0]),) + a[1:])
            emb, head = model.get_input_embeddings(), model.get_output_embeddings()
            tied = head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr()
            if not tied:  # an untied output.weight in its own type (before the embedding: no aliasing)
                head.weight.copy_(stored_embedding(head.weight.detach().float(), output_type).to(head.weight.dtype))
            emb.weight.copy_(stored_embedding(emb.weight.detach().float(), embed_type).to(emb.weight.dtype))
            head_input = _HEAD_INPUT[EMBED_TYPES[embed_type if tied else output_type].activations]
            if head_input is not None:
                head.register_forward_pre_hook(lambda _m, a, f=head_input: (f(a[0]),) + a[1:])
        return rt.logits(ids)


def runtime_probe(fmt: Format, path: Path, ids: list[int], text: str, tokenizer, log, bitnet_cpp=None,
                  i2s_layout: str = "x86") -> tuple[np.ndarray, str] | None:
    """(the format's runtime's logits for ``ids`` from the export at ``path``, the tokenization verdict),
    or None (logged) when that runtime is not here to check in."""
    from bitnet_train import runtimes as R
    from bitnet_train.runtimes import bitnetcpp, ikllama, isolated, llamacpp
    from bitnet_train.runtimes.base import same_tokens

    if fmt.runtime == "llama.cpp" and not llamacpp.available():
        log("verify: llama-cpp-python is not installed; the GGUF was NOT checked in llama.cpp "
            "(pip install 'bitnet-train[llama]')")
        return None
    if fmt.runtime == "ik_llama.cpp" and not ikllama.available():
        log(f"verify: {ikllama.WHEEL} is not installed; the GGUF was NOT checked in ik_llama.cpp "
            "(pip install 'bitnet-train[ik]')")
        return None
    if fmt.runtime == "bitnet.cpp":
        if bitnetcpp.bitnet_cpp_dir(bitnet_cpp) is None:
            log("verify: no bitnet.cpp build given (--bitnet-cpp DIR or BITNET_CPP_DIR); the I2_S file was NOT "
                "checked in bitnet.cpp (llama.cpp cannot load I2_S)")
            return None
        host = "arm" if platform.machine().lower() in ("arm64", "aarch64") else "x86"
        if i2s_layout != host:
            log(f"verify: the {i2s_layout} I2_S layout cannot be run on this {host} machine; the file was NOT "
                "checked in bitnet.cpp")
            return None
    if fmt.runtime == "transformers":  # the same tokenizer files travel with the export
        with R.StockTransformers(path) as rt:
            return rt.logits(ids), "same tokenizer files"
    text = text[:2000]
    try:
        if fmt.isolated:
            theirs, toks = isolated.isolated_probe(fmt.runtime, path, ids, text)
        else:
            # graph_check off: a file written with --force is measured, not refused
            with R.open_model(path, engine=fmt.runtime, n_ctx=max(64, len(ids) + 8), all_logits=True,
                              bitnet_cpp=bitnet_cpp, graph_check=False) as rt:
                theirs, toks = rt.probe(ids, text)
    except R.EngineError as e:
        raise ExportError(f"verify: {e}") from None
    if toks is None:
        return theirs, f"not checked ({fmt.runtime} here gives no tokenization the probe knows)"
    # both with their own special-token policy: the runtime adds BOS only when the GGUF says so
    return theirs, same_tokens(list(tokenizer(text)["input_ids"]), list(toks))


def verify_export(src, tokenizer, fmt: Format, path: Path, text: str, probe_tokens: int, log, bitnet_cpp=None,
                  i2s_layout: str = "x86", embed_type: str | None = None,
                  output_type: str | None = None) -> Agreement | None:
    """The export at ``path`` in its runtime against the checkpoint ``src`` in our forward (None: not
    checked, said in the log); ``embed_type`` / ``output_type``: how the file stores the embedding and an
    untied head (for the emulation)."""
    ids = probe_ids(tokenizer, text, probe_tokens)
    got = runtime_probe(fmt, path, ids, text, tokenizer, log, bitnet_cpp, i2s_layout)
    if got is None:
        return None
    theirs, tokenization = got
    ours = our_logits(src.path, ids)
    emulated = emulated_logits(src.path, ids, fmt.emulate, embed_type, output_type) if fmt.emulate else None
    if fmt.our_activations:
        floats = None  # its runtime quantizes activations as we do: no sensitivity allowance
    elif fmt.emulate == "f32" and {embed_type or "f32", output_type or embed_type or "f32"} == {"f32"}:
        floats = emulated  # the F32 file's emulation is our model with float activations already
    else:
        floats = emulated_logits(src.path, ids, "f32", "f32", "f32")
    ag = compare(fmt, theirs, ours, tokenization, ours_emulated=emulated, ids=ids, ours_float=floats)
    log(str(ag))
    return ag
