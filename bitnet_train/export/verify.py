"""Verification of an export: the runtime's logits against our model's, on a probe text.

Our side: the checkpoint loaded by :func:`bitnet_train.checkpoint.load_checkpoint` (BitLinear,
``torch`` backend, fp32) — the forward the trainer ran. Runtime side: stock transformers for
``hf`` (no bitnet_train code involved), llama.cpp through ``llama-cpp-python`` for GGUF, and for
I2_S a bitnet.cpp build (``--bitnet-cpp DIR`` or ``BITNET_CPP_DIR``) through a small C program
compiled against that build's ``llama.h`` and ``libllama`` (:func:`bitnet_cpp_logits`), fed the
same token ids (``eval(ids)``, so a tokenizer difference cannot hide a weight error; tokenization
agreement is checked separately).

Metrics over all probe positions: relative error ``||runtime - ours|| / ||ours||`` of the logits
and top-1 agreement (share of positions whose argmax token is the same). Reported beside them, not a
gate: the probe's perplexity in both, ``exp(mean NLL)`` of its tokens ``ids[1:]`` from each side's own
logits (float64 log-softmax, :func:`bitnet_train.nll.window_nll`, as ``bitnet-train eval`` sums it).

Tolerances (:data:`TOLERANCES`) were set from measurements on trained tiny models (README,
"Export"), with margin; a ReLU² model in llama.cpp or a ternary export with its scales dropped
is far outside them (tested) — on a model whose layers matter: on a barely trained one (40 steps of
the test model) the logits are mostly the embedding's unigram guess, and a TQ2_0 file with every
scale dropped measured 3.5e-2, inside the TQ tolerance (200 steps: 1.1e-1, caught).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# format -> (max relative logit error vs the trainer's forward, min top-1 agreement,
#            max relative error vs our model with the runtime's arithmetic emulated, or None)
# Measured (README, "Export") on a tiny model trained 40 steps: hf 1e-7 to 1.5e-5; F32/F16
# 1.8e-3, TQ2_0/TQ1_0 1.3e-3, top-1 100%; on a random-initialised one, whose activations suffer
# more from int8 quantization, F32 2.8e-2 and TQ2_0 2.8e-2-3.0e-2 with top-1 92-95%. F32/F16
# quantize no activations in llama.cpp, so they get a second, tight check against exactly that
# computation (measured 1.7e-5 F32 and 2.8e-5 F16 trained, 3.6e-4 F32 random). A ReLU² model
# forced through llama.cpp measured 1.1e-1 after 40 training steps (the gap grows with training).
TOLERANCES = {
    # stock transformers unpacks the same codes and quantizes activations the same way (per
    # token int8); only float summation order differs
    "hf": (1e-3, 0.99, None),
    "f32": (5e-2, 0.90, 2e-3),
    "f16": (5e-2, 0.90, 2e-3),
    # llama.cpp quantizes activations to int8 in 256-wide blocks (Q8_K), not per token
    "tq2_0": (5e-2, 0.90, None),
    "tq1_0": (5e-2, 0.90, None),
    # bitnet.cpp's I2_S path quantizes activations per token to int8 as we do and multiplies the
    # codes exactly; token_embd and the KV cache are F16. Measured 2.8e-4 to 9.3e-4 trained, 2.8e-2
    # random-init (int8 rounding flips amplify the F16 differences); a wrong block layout, a
    # transposed or shifted packing, or a dropped scale measured 1.6e-1 to 1.3e+0
    "i2_s": (5e-2, 0.90, None),
    # ik_llama.cpp, bitnet-25 graph (ReLU²), scales folded into the weights. Measured with
    # `python scripts/bench_ik.py tolerances --widths 256,512 --seeds 0,1 --steps 0,40` (2-layer
    # ReLU² models, 512-token BPE, 128-token held-out probe; docs/runtimes.md): trained 40 steps,
    # F32/F16 1.8e-3 to 2.9e-3, IQ2_BN 1.6e-3 to 2.0e-3, IQ2_BN_R4 1.4e-3 to 2.1e-3, IQ1_BN 1.6e-3
    # to 1.9e-3, top-1 99-100%; random init 2.9e-2 to 3.6e-2 for every format (our per-token int8
    # activations against ik's fp or Q8_K64 ones, amplified by near-uniform logits), top-1 91-98%.
    # F32/F16 against our model with ik's arithmetic emulated: 1.1e-5 to 5.7e-5 trained, at most
    # 3.6e-4 (F32) and 8.7e-4 (F16) random. The IQ types quantize activations as we do not (Q8_K64
    # blocks), so they are not emulated; their top-1 floor is lower for random-init models (91.4%
    # measured). Scales not folded in (codes alone) measured far outside (tests/test_export_ik.py).
    "ik_f32": (5e-2, 0.90, 2e-3),
    "ik_f16": (5e-2, 0.90, 2e-3),
    "iq2_bn": (5e-2, 0.85, None),
    "iq2_bn_r4": (5e-2, 0.85, None),
    "iq1_bn": (5e-2, 0.85, None),
}
IK_FORMATS = ("ik_f32", "ik_f16", "iq2_bn", "iq2_bn_r4", "iq1_bn")

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
    from ..nll import window_nll

    logits = np.asarray(logits)
    if len(ids) < 2 or logits.shape[0] != len(ids):
        raise ValueError(f"probe perplexity: {logits.shape[0]} logit rows for {len(ids)} tokens")
    n = len(ids) - 1
    return float(np.exp(window_nll(logits[:n], list(ids), n) / n))


def compare(
    fmt: str, runtime: np.ndarray, ours: np.ndarray, tokenization: str = "not checked",
    ours_emulated: np.ndarray | None = None, ids: list[int] | None = None,
) -> Agreement:
    """``ours``: the trainer's forward; ``ours_emulated``: :func:`our_logits` with ``emulate=fmt``
    (needed for the formats that have an emulation tolerance); ``ids``: the probe tokens both were fed,
    for the probe perplexity of each."""
    rel = rel_error(runtime, ours)
    top1 = float(np.mean(np.asarray(runtime).argmax(-1) == np.asarray(ours).argmax(-1)))
    max_rel, min_top1, max_w = TOLERANCES[fmt]
    w = rel_error(runtime, ours_emulated) if ours_emulated is not None else None
    ppl = (probe_perplexity(ours, ids), probe_perplexity(runtime, ids)) if ids is not None else (None, None)
    return Agreement(fmt, rel, top1, int(np.asarray(ours).shape[0]), max_rel, min_top1, tokenization, w,
                     max_w, *ppl)


def probe_ids(tokenizer, text: str, max_tokens: int = 128) -> list[int]:
    """The probe as the tokenizer encodes it for the model (its own BOS/EOS policy)."""
    ids = tokenizer(text)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise ValueError("the probe text is too short: it gives fewer than 2 tokens")
    return [int(i) for i in ids]


def our_logits(checkpoint: str | Path, ids: list[int], emulate: str | None = None) -> np.ndarray:
    """Logits of the trainer's forward (BitLinear, torch backend, fp32).

    ``emulate``: the same model and ternary weights (``codes * scale``) with llama.cpp's
    arithmetic for that GGUF format instead of our per-token int8 activations — ``f32``: no
    activation quantization; ``f16``: activations and ``token_embd`` rounded to fp16. The
    difference to the runtime is then float summation order (and the fp16 KV cache), so a small
    tolerance catches any error in the exported weights. TQ formats are not emulated: quantizing
    activations in 256-wide int8 blocks (Q8_K) here left a 2e-2 residual on a random-initialised
    model, so the arithmetic of llama.cpp's TQ path is not reproduced exactly."""
    import torch

    from ..bitlinear import bitlinear_modules
    from ..checkpoint import load_checkpoint
    from ..quant import weight_fake_quant_values

    model = load_checkpoint(checkpoint, backend="torch", dtype=torch.float32).eval()
    hooks = []
    if emulate is not None:
        if emulate not in ("f32", "f16"):
            raise ValueError(f"no emulation of llama.cpp for {emulate!r}")

        def f16(x):
            return x.half().float()

        act = {"f32": None, "f16": f16}[emulate]
        with torch.no_grad():
            for _, m in bitlinear_modules(model):
                m.weight.copy_(weight_fake_quant_values(m.weight))
                m.quant_lambda = 0.0  # plain F.linear on the already ternary weights
                if act is not None:
                    hooks.append(m.register_forward_pre_hook(lambda _m, a, act=act: (act(a[0]),) + a[1:]))
            if emulate != "f32":
                emb = model.get_input_embeddings()
                emb.weight.copy_(f16(emb.weight))  # token_embd is stored F16 (tied: also the head)
                head = model.get_output_embeddings()
                hooks.append(head.register_forward_pre_hook(lambda _m, a: (f16(a[0]),) + a[1:]))
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0].float().numpy()
    for h in hooks:
        h.remove()
    del model
    return out


def hf_logits(path: str | Path, ids: list[int]) -> np.ndarray:
    """Logits of stock transformers on an exported ``hf`` directory. transformers runs its BitNet
    quantizers under ``torch.compile``; the eager path computes the same function without the
    compiler (and without a C toolchain), so dynamo is disabled for the call."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch._dynamo.config.patch(disable=True):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        with torch.no_grad():
            out = model(torch.tensor([ids])).logits[0].float().numpy()
    del model
    return out


def llama_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


def open_llama(path: str | Path, n_ctx: int = 512, logits_all: bool = False):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        logits_all=logits_all,
        n_threads=max(1, min(os.cpu_count() or 1, 8)),
        n_batch=min(n_ctx, 512),
        verbose=False,
    )


def gguf_logits(path: str | Path, ids: list[int], text: str | None = None, tokenizer=None) -> tuple[np.ndarray, str]:
    """llama.cpp's logits for ``ids`` and whether it tokenizes ``text`` as ``tokenizer`` does."""
    llm = open_llama(path, n_ctx=max(64, len(ids) + 8), logits_all=True)
    try:
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
        tokenization = "not checked"
        if text is not None and tokenizer is not None:
            # both with their special-token policy: llama.cpp adds BOS only when the GGUF says so
            theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            tokenization = _same_tokens(list(tokenizer(text)["input_ids"]), list(theirs))
    finally:
        llm.close()
    return logits, tokenization


# ----------------------------------------------------------------------------------------------
# bitnet.cpp (I2_S)
# ----------------------------------------------------------------------------------------------

PROBE_SOURCE = Path(__file__).with_name("bitnet_cpp_probe.c")


def bitnet_cpp_dir(explicit: str | Path | None = None) -> Path | None:
    """The bitnet.cpp checkout to verify I2_S in: ``explicit``, else ``$BITNET_CPP_DIR``."""
    d = explicit or os.environ.get("BITNET_CPP_DIR")
    return Path(d).expanduser().resolve() if d else None


def _find_one(root: Path, names: tuple[str, ...], what: str, executable: bool = False) -> Path:
    """The shallowest file under ``root`` with one of ``names`` (in that order of preference)."""
    for name in names:
        for p in sorted(Path(root).rglob(name), key=lambda p: len(p.parts)):
            if p.is_file() and (not executable or os.access(p, os.X_OK)):
                return p
    raise FileNotFoundError(f"bitnet.cpp at {root}: no {what} ({' or '.join(names)}) found; build it first "
                            "(python setup_env.py ..., or cmake -B build && cmake --build build)")


def bitnet_cpp_program(root: Path, name: str) -> Path:
    """A built executable of the bitnet.cpp checkout at ``root`` (``llama-cli``, ``llama-bench``)."""
    return _find_one(root, (name,), f"built {name}", executable=True)


def build_probe(root: Path) -> tuple[Path, bool]:
    """Compile :data:`PROBE_SOURCE` against the bitnet.cpp build at ``root`` (cached by build).
    Returns the program and whether it can tokenize (``llama_tokenize`` in one of its two forms)."""
    import hashlib
    import shutil
    import subprocess

    if not root.is_dir():
        raise FileNotFoundError(f"bitnet.cpp directory {root} does not exist")
    header = _find_one(root, ("llama.h",), "llama.h")
    ggml_h = _find_one(root, ("ggml.h",), "ggml.h")
    lib = _find_one(root, ("libllama.so", "libllama.dylib", "libllama.a"), "built libllama")
    key = hashlib.sha256(
        f"{root}|{lib}|{lib.stat().st_mtime_ns}|{PROBE_SOURCE.read_bytes().hex()}".encode()
    ).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bitnet_train"
    for api in (1, 2, 0):
        exe = cache / f"bitnet_cpp_probe-{key}-t{api}"
        if exe.exists():
            return exe, api != 0
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise FileNotFoundError("no C compiler (cc, gcc or clang) to build the bitnet.cpp probe")
    cache.mkdir(parents=True, exist_ok=True)
    libdirs = {lib.parent}
    if lib.suffix == ".a":
        extra = [str(lib)] + [str(p) for p in root.rglob("libggml*.a")] + ["-lstdc++", "-lm", "-lpthread", "-fopenmp"]
    else:
        libdirs |= {p.parent for p in root.rglob("libggml*.so")} | {p.parent for p in root.rglob("libggml*.dylib")}
        extra = ["-lllama"]
    errors = []
    for api in (1, 2, 0):  # llama_tokenize(model, ...) in 2024 builds, (vocab, ...) later; else none
        exe = cache / f"bitnet_cpp_probe-{key}-t{api}"
        cmd = [cc, "-O1", f"-DPROBE_TOKENIZE={api}", "-Werror=incompatible-pointer-types",
               "-Werror=implicit-function-declaration", "-o", str(exe) + ".tmp", str(PROBE_SOURCE),
               "-I", str(header.parent), "-I", str(ggml_h.parent)]
        for d in sorted(libdirs):
            cmd += ["-L", str(d), f"-Wl,-rpath,{d}"]
        r = subprocess.run(cmd + extra, capture_output=True, text=True)
        if r.returncode == 0:
            os.replace(str(exe) + ".tmp", exe)
            return exe, api != 0
        errors.append(f"{' '.join(cmd + extra)}\n{r.stderr[-2000:]}")
    raise RuntimeError(f"building the bitnet.cpp probe against {root} failed:\n" + "\n".join(errors))


def bitnet_cpp_logits(
    root: Path, path: str | Path, ids: list[int], threads: int | None = None, text: str | None = None,
    tokenizer=None,
) -> tuple[np.ndarray, str]:
    """bitnet.cpp's logits for ``ids`` (all positions, one batch) from the GGUF at ``path``, and
    whether it tokenizes ``text`` as ``tokenizer`` does (when the build's API allows)."""
    import subprocess
    import tempfile

    exe, can_tokenize = build_probe(root)
    threads = threads or max(1, min(os.cpu_count() or 1, 8))
    check = can_tokenize and text is not None and tokenizer is not None
    with tempfile.TemporaryDirectory() as d:
        idf, outf, textf, tokf = (Path(d) / n for n in ("ids.bin", "logits.bin", "text.txt", "tokens.bin"))
        np.asarray(ids, dtype=np.int32).tofile(idf)
        cmd = [str(exe), str(path), str(idf), str(outf), str(threads)]
        if check:
            textf.write_bytes(text.encode("utf-8"))
            cmd += [str(textf), str(tokf)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"bitnet.cpp failed on {path} (exit {r.returncode}): {r.stderr[-2000:]}")
        logits = np.fromfile(outf, dtype=np.float32)
        theirs = np.fromfile(tokf, dtype=np.int32).tolist() if check else None
    tokenization = "not checked (this bitnet.cpp build has no llama_tokenize the probe knows)"
    if theirs is not None:
        tokenization = _same_tokens(list(tokenizer(text)["input_ids"]), theirs)
    return logits.reshape(len(ids), -1), tokenization


def _same_tokens(ours: list[int], theirs: list[int]) -> str:
    if ours == theirs:
        return f"identical ({len(ours)} tokens)"
    n = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return f"DIFFERS at token {n} ({len(ours)} vs {len(theirs)} tokens)"
