"""Verification of an export: the runtime's logits against our model's, on a probe text.

Our side: the checkpoint in :class:`~bitnet_train.runtimes.torch_model.OurForward` (BitLinear, ``torch``
backend, fp32) — the forward the trainer ran. Runtime side: the format's runtime
(:attr:`~.formats.Format.runtime`, opened through :mod:`bitnet_train.runtimes`), fed the same token ids, so
a tokenizer difference cannot hide a weight error; whether the runtime tokenizes the probe text as our
tokenizer does is checked separately.

Metrics over all probe positions: relative error ``||runtime - ours|| / ||ours||`` of the logits and top-1
agreement (share of positions whose argmax token is the same), against the format's
:class:`~.formats.Tolerance` (measured figures in :mod:`.formats`). Reported beside them, not a gate: the
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

    @property
    def ppl_rel(self) -> float | None:
        """|runtime's probe perplexity / ours - 1|."""
        if self.ppl_ours is None or self.ppl_runtime is None:
            return None
        return abs(self.ppl_runtime / self.ppl_ours - 1.0)

    def as_dict(self) -> dict:
        """The figures as JSON values (``export --json``)."""
        from dataclasses import asdict

        return {**asdict(self), "ppl_rel": self.ppl_rel, "ok": self.ok}

    @property
    def ok(self) -> bool:
        good = bool(np.isfinite(self.rel_error)) and self.rel_error <= self.max_rel and self.top1 >= self.min_top1
        if self.max_emulated_rel is not None:
            good = good and self.emulated_rel is not None and self.emulated_rel <= self.max_emulated_rel
        return good and not self.tokenization.startswith("DIFFERS")

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        s = (
            f"verify [{self.fmt}] {verdict}: relative logit error {self.rel_error:.3e} (tolerance {self.max_rel:.0e}), "
            f"top-1 agreement {self.top1:.1%} (tolerance {self.min_top1:.0%}) over {self.positions} positions"
        )
        if self.max_emulated_rel is not None:
            s += (
                f"; vs our model with {self.fmt}'s arithmetic emulated {self.emulated_rel:.3e} "
                f"(tolerance {self.max_emulated_rel:.0e})"
            )
        if self.ppl_rel is not None:
            s += (f"; probe perplexity ours {self.ppl_ours:.4f}, runtime {self.ppl_runtime:.4f} "
                  f"(relative difference {self.ppl_rel:.2e})")
        return s + f"; tokenization: {self.tokenization}"


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
    ours_emulated: np.ndarray | None = None, ids: list[int] | None = None,
) -> Agreement:
    """``ours``: the trainer's forward; ``ours_emulated``: :func:`emulated_logits` with ``fmt.emulate``
    (needed for the formats that have an emulation tolerance); ``ids``: the probe tokens both were fed,
    for the probe perplexity of each."""
    rel = rel_error(runtime, ours)
    top1 = float(np.mean(np.asarray(runtime).argmax(-1) == np.asarray(ours).argmax(-1)))
    t = fmt.tolerance
    w = rel_error(runtime, ours_emulated) if ours_emulated is not None else None
    ppl = (probe_perplexity(ours, ids), probe_perplexity(runtime, ids)) if ids is not None else (None, None)
    return Agreement(fmt.key, rel, top1, int(np.asarray(ours).shape[0]), t.max_rel, t.min_top1, tokenization, w,
                     t.max_emulated, *ppl)


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


EMULATIONS = ("f32", "f16", "q2_0")


def emulated_logits(checkpoint: str | Path, ids: list[int], emulate: str) -> np.ndarray:
    """Our model and ternary weights with a runtime's arithmetic for a GGUF instead of our per-token int8
    activations — ``f32``: weights ``codes * scale``, no activation quantization; ``f16``: activations and
    ``token_embd`` rounded to fp16; ``q2_0``: weights ``codes * fp16(scale)`` (the block scale Q2_0 stores)
    and activations through Q8_0 blocks of 32 (llama.cpp's ``vec_dot_q2_0_q8_0``), the embedding and the
    head in fp16. The difference to the runtime is then float summation order (and the fp16 KV cache), so a
    small tolerance catches any error in the exported weights or their order. TQ formats are not emulated:
    quantizing activations in 256-wide int8 blocks (Q8_K) here left a 2e-2 residual on a random-initialised
    model, so the arithmetic of llama.cpp's TQ path is not reproduced exactly."""
    import torch

    from bitnet_train.layers.bitlinear import bitlinear_modules
    from bitnet_train.quant import weight_quant
    from bitnet_train.runtimes import OurForward

    if emulate not in EMULATIONS:
        raise ValueError(f"no emulation of a runtime's {emulate!r} arithmetic")

    def f16(x):
        return x.half().float()

    act = {"f32": None, "f16": f16, "q2_0": _q8_0}[emulate]
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
            if emulate != "f32":
                emb = model.get_input_embeddings()
                emb.weight.copy_(f16(emb.weight))  # token_embd is stored F16 (tied: also the head)
                head = model.get_output_embeddings()
                head.weight.copy_(f16(head.weight))  # an untied output.weight too
                head.register_forward_pre_hook(lambda _m, a: (f16(a[0]),) + a[1:])
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
                  i2s_layout: str = "x86") -> Agreement | None:
    """The export at ``path`` in its runtime against the checkpoint ``src`` in our forward (None: not
    checked, said in the log)."""
    ids = probe_ids(tokenizer, text, probe_tokens)
    got = runtime_probe(fmt, path, ids, text, tokenizer, log, bitnet_cpp, i2s_layout)
    if got is None:
        return None
    theirs, tokenization = got
    ours = our_logits(src.path, ids)
    emulated = emulated_logits(src.path, ids, fmt.emulate) if fmt.emulate else None
    ag = compare(fmt, theirs, ours, tokenization, ours_emulated=emulated, ids=ids)
    log(str(ag))
    return ag
