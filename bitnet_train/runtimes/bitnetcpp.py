"""bitnet.cpp (microsoft/BitNet): I2_S GGUFs, in a build the user names (``--bitnet-cpp DIR`` or
``BITNET_CPP_DIR``; bitnet.cpp has no Python package).

Logits: a small C program (``bitnet_cpp_probe.c``) compiled against the build's own ``llama.h`` and
``libllama`` and cached, fed token ids (so a tokenizer difference cannot hide a weight error) and, where
the build's API allows, the text to tokenize. Generation: the build's ``llama-cli``, whose own timing
report gives the speeds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bitnet_train.runtimes.base import EngineError, Runtime, default_threads, result
from bitnet_train.runtimes.gguf_header import CHAT_KEYS, chat_template, read_header

GGML_TYPE_I2_S = 36  # GGML_TYPE_I2_S in bitnet.cpp's ggml.h
FILE_TYPE_I2_S = 40  # LLAMA_FTYPE_MOSTLY_I2_S in bitnet.cpp's llama.h
PROBE_SOURCE = Path(__file__).with_name("bitnet_cpp_probe.c")


def bitnet_cpp_dir(explicit: str | Path | None = None) -> Path | None:
    """The bitnet.cpp checkout to run I2_S in: ``explicit``, else ``$BITNET_CPP_DIR``."""
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


def program(root: Path, name: str) -> Path:
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


class BitnetCpp(Runtime):
    """An I2_S GGUF in the bitnet.cpp build at ``root`` (None: ``$BITNET_CPP_DIR``)."""

    name = "bitnet.cpp"

    def __init__(self, path: str | Path, root: str | Path | None = None, threads: int | None = None,
                 n_ctx: int | None = None, all_logits: bool = False):
        self.root = bitnet_cpp_dir(root)
        if self.root is None:
            raise EngineError(f"{path} is an I2_S GGUF, which only bitnet.cpp runs (llama.cpp has no I2_S type): "
                              "pass --bitnet-cpp DIR (or set BITNET_CPP_DIR) to a built bitnet.cpp checkout")
        self.path, self.threads = Path(path), threads or default_threads()
        arch = read_header(self.path, keys=("general.architecture",))[0].get("general.architecture")
        self.n_ctx_train = int(read_header(self.path, keys=(f"{arch}.context_length",))[0].get(
            f"{arch}.context_length") or 2048)
        self.n_ctx = int(n_ctx or self.n_ctx_train)

    def render(self, messages: list[dict]) -> str:
        if self.template is None:  # read on first use: the token list of a big vocabulary takes seconds
            meta = read_header(self.path, keys=(*CHAT_KEYS, "tokenizer.ggml.tokens"))[0]
            toks = meta.get("tokenizer.ggml.tokens") or []
            self.template, self.special = chat_template(meta.get, lambda i: toks[i] if i < len(toks) else "")
        return super().render(messages)

    def probe(self, ids: list[int], text: str | None = None) -> tuple[np.ndarray, list[int] | None]:
        """(logits of every position of ``ids`` in one batch, the build's tokenization of ``text`` with
        BOS as the file says, or None where the build's API has no tokenizer the probe knows)."""
        import subprocess
        import tempfile

        try:
            exe, can_tokenize = build_probe(self.root)
        except (OSError, RuntimeError) as e:
            raise EngineError(str(e)) from None
        check = can_tokenize and text is not None
        with tempfile.TemporaryDirectory() as d:
            idf, outf, textf, tokf = (Path(d) / n for n in ("ids.bin", "logits.bin", "text.txt", "tokens.bin"))
            np.asarray(ids, dtype=np.int32).tofile(idf)
            cmd = [str(exe), str(self.path), str(idf), str(outf), str(self.threads)]
            if check:
                textf.write_bytes(text.encode("utf-8"))
                cmd += [str(textf), str(tokf)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise EngineError(f"bitnet.cpp failed on {self.path} (exit {r.returncode}): {r.stderr[-2000:]}")
            logits = np.fromfile(outf, dtype=np.float32)
            theirs = np.fromfile(tokf, dtype=np.int32).tolist() if check else None
        return logits.reshape(len(ids), -1), theirs

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.probe(ids)[0]

    def complete(self, text: str, n: int, temperature: float, chat: bool) -> dict:
        import re
        import subprocess

        try:
            cli = program(self.root, "llama-cli")
        except FileNotFoundError as e:
            raise EngineError(str(e)) from None
        cmd = [str(cli), "-m", str(self.path), "-p", text, "-n", str(n), "--temp", str(temperature), "-s", "0",
               "-t", str(self.threads), "-c", str(self.n_ctx), "--simple-io"]
        help_text = subprocess.run([str(cli), "--help"], capture_output=True, text=True).stdout
        if "-no-cnv" in help_text:
            cmd.append("-no-cnv")  # newer builds chat by default when the file has a chat template
        if chat and "--no-display-prompt" in help_text:
            cmd.append("--no-display-prompt")
        r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise EngineError(f"bitnet.cpp's llama-cli failed on {self.path} (exit {r.returncode}): "
                              f"{r.stderr.strip()[-1500:]}")

        def timing(label):  # "<label> =  8.71 ms /  29 runs" (or "tokens")
            m = re.search(rf"\b{label} time =\s*([\d.]+) ms /\s*(\d+) (?:runs|tokens)", r.stderr)
            return (float(m.group(1)) / 1000, int(m.group(2))) if m else (float("nan"), 0)

        prompt_s, n_prompt = timing("prompt eval")
        decode_s, steps = timing("(?<!prompt )eval")
        # llama-cli prints the prompt, the new text, " [end of text]" at EOS, then two newlines
        out = r.stdout.removesuffix("\n\n").removesuffix(" [end of text]")
        if not chat:
            out = out.removeprefix(text)
        _, sampled = timing("sampling")  # the prompt's tokens and each new one pass the sampler
        res = result(self.name, out, n_prompt, max(sampled - n_prompt, 0), prompt_s, decode_s, self.n_ctx)
        res["tokens_per_s"] = steps / decode_s if steps and decode_s > 0 else float("nan")  # per decode step
        return res
