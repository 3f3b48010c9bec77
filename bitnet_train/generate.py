"""``bitnet-train generate MODEL --prompt TEXT``: run an exported model on the CPU.

A ``.gguf`` file runs in llama.cpp (``llama-cpp-python``), an I2_S ``.gguf`` in bitnet.cpp (its
``llama-cli``, given ``--bitnet-cpp DIR`` or ``BITNET_CPP_DIR``); a directory (an ``export --format
hf`` output, or a checkpoint) runs in stock transformers. Greedy decoding by default; prints the text
and the decode speed (new tokens per second, prompt processing excluded).
"""

from __future__ import annotations

import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("generate", help="run an exported model (GGUF in llama.cpp, hf dir in transformers) on the CPU")
    p.add_argument("model", help="a .gguf file or a model directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all)")
    p.add_argument("--bitnet-cpp", metavar="DIR",
                   help="a built bitnet.cpp checkout, to run I2_S files in (default: $BITNET_CPP_DIR)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    r = generate(args.model, args.prompt, args.max_new_tokens, args.temperature, args.threads, args.bitnet_cpp)
    print(r["text"])
    print(
        f"[{r['runtime']}] {r['new_tokens']} new tokens in {r['decode_s']:.2f} s: {r['tokens_per_s']:.1f} tokens/s "
        f"(prompt {r['prompt_tokens']} tokens in {r['prompt_s']:.2f} s)"
    )
    return 0


def generate(
    model, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, threads: int | None = None,
    bitnet_cpp: str | None = None,
) -> dict:
    from .errors import UserError
    from .export.gguf import I2S_FILE_TYPE
    from .export.verify import bitnet_cpp_dir

    p = Path(model)
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if p.is_file() and p.suffix == ".gguf":
        with open(p, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise UserError(f"{model}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); truncated or not an export?")
        if gguf_file_type(p) == I2S_FILE_TYPE:
            root = bitnet_cpp_dir(bitnet_cpp)
            if root is None:
                raise UserError(
                    f"{model} is an I2_S GGUF, which only bitnet.cpp runs (llama.cpp has no I2_S type): "
                    "pass --bitnet-cpp DIR (or set BITNET_CPP_DIR) to a built bitnet.cpp checkout"
                )
            return _bitnet_cpp(root, p, prompt, max_new_tokens, temperature, threads)
        return _llama(p, prompt, max_new_tokens, temperature, threads)
    if p.is_dir():
        return _transformers(p, prompt, max_new_tokens, temperature, threads)
    raise UserError(f"{model}: not a .gguf file or a model directory")


def gguf_file_type(path: Path) -> int | None:
    """``general.file_type`` of a GGUF, read from its metadata (the ``gguf`` package's reader also
    parses the tensor infos, and stops at I2_S's type id, which it does not know)."""
    import gguf
    import numpy as np

    try:
        r = gguf.GGUFReader(str(path))
    except ValueError:
        pass  # an unknown tensor type: read the one key by hand below
    else:
        f = r.fields.get("general.file_type")
        return int(f.parts[f.data[0]][0]) if f is not None else None
    # GGUF v2/v3: magic, version u32, n_tensors u64, n_kv u64, then key (u64 length + bytes),
    # value type u32, value. general.file_type is a UINT32 (type 4) written before the tokenizer.
    head = np.fromfile(path, dtype=np.uint8, count=1 << 16).tobytes()
    key = b"general.file_type"
    i = head.find(len(key).to_bytes(8, "little") + key)
    if i < 0:
        return None
    j = i + 8 + len(key)
    if int.from_bytes(head[j : j + 4], "little") != 4:
        return None
    return int.from_bytes(head[j + 4 : j + 8], "little")


def _llama(path: Path, prompt: str, n: int, temperature: float, threads: int | None) -> dict:
    from .errors import UserError

    try:
        import llama_cpp
    except ImportError:
        raise UserError("running a GGUF needs llama-cpp-python: pip install 'bitnet-train[llama]'") from None
    import os

    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=threads or os.cpu_count(), verbose=False)
    except ValueError as e:  # llama-cpp-python: "Failed to load model from file"
        raise UserError(f"{path}: llama.cpp cannot load this GGUF (truncated, or not a model?): {e}") from None
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)  # BOS only if the GGUF asks
    if not ids:
        raise UserError("the prompt is empty")
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    out: list[int] = []
    eos = llm.token_eos()
    for _ in range(n):
        tok = llm.sample(temp=temperature, top_k=0 if temperature > 0 else 1, top_p=1.0, min_p=0.0)
        if tok == eos:
            break
        out.append(tok)
        llm.eval([tok])
    t2 = time.perf_counter()
    text = prompt + llm.detokenize(out).decode("utf-8", errors="replace")
    llm.close()
    return _result("llama.cpp", text, len(ids), len(out), t1 - t0, t2 - t1)


def _bitnet_cpp(root: Path, path: Path, prompt: str, n: int, temperature: float, threads: int | None) -> dict:
    """bitnet.cpp's ``llama-cli`` on the file; speeds from its own timing report."""
    import os
    import re
    import subprocess

    from .errors import UserError
    from .export.verify import bitnet_cpp_program

    try:
        cli = bitnet_cpp_program(root, "llama-cli")
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    cmd = [str(cli), "-m", str(path), "-p", prompt, "-n", str(n), "--temp", str(temperature), "-s", "0",
           "-t", str(threads or os.cpu_count() or 1), "--simple-io"]
    if "-no-cnv" in subprocess.run([str(cli), "--help"], capture_output=True, text=True).stdout:
        cmd.append("-no-cnv")  # newer builds chat by default when the file has a chat template
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise UserError(f"bitnet.cpp's llama-cli failed on {path} (exit {r.returncode}): {r.stderr.strip()[-1500:]}")

    def timing(label):  # "<label> =  8.71 ms /  29 runs" (or "tokens")
        m = re.search(rf"\b{label} time =\s*([\d.]+) ms /\s*(\d+) (?:runs|tokens)", r.stderr)
        return (float(m.group(1)) / 1000, int(m.group(2))) if m else (float("nan"), 0)

    prompt_s, n_prompt = timing("prompt eval")
    decode_s, steps = timing("(?<!prompt )eval")
    # llama-cli prints the prompt, the new text, " [end of text]" at EOS, then two newlines
    text = r.stdout.removesuffix("\n\n").removesuffix(" [end of text]")
    _, sampled = timing("sampling")  # the prompt's tokens and each new one pass the sampler
    out = _result("bitnet.cpp", text, n_prompt, max(sampled - n_prompt, 0), prompt_s, decode_s)
    out["tokens_per_s"] = steps / decode_s if steps and decode_s > 0 else float("nan")  # per decode step
    return out


def _transformers(path: Path, prompt: str, n: int, temperature: float, threads: int | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(path))
    with torch._dynamo.config.patch(disable=True):  # transformers' BitNet kernels are torch.compile'd
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        enc = tok(prompt, return_tensors="pt")
        ids = enc["input_ids"]  # the tokenizer's own BOS policy, as llama.cpp follows the GGUF's
        with torch.no_grad():
            t0 = time.perf_counter()
            outp = model(ids, use_cache=True)
            past = outp.past_key_values
            t1 = time.perf_counter()
            logits = outp.logits[0, -1]
            new = []
            for _ in range(n):
                if temperature > 0:
                    nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1))
                else:
                    nxt = int(logits.argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
                outp = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past, logits = outp.past_key_values, outp.logits[0, -1]
            t2 = time.perf_counter()
    return _result("transformers", prompt + tok.decode(new), ids.shape[1], len(new), t1 - t0, t2 - t1)


def _result(runtime, text, n_prompt, n_new, prompt_s, decode_s) -> dict:
    return {
        "runtime": runtime,
        "text": text,
        "prompt_tokens": n_prompt,
        "new_tokens": n_new,
        "prompt_s": prompt_s,
        "decode_s": decode_s,
        "tokens_per_s": n_new / decode_s if decode_s > 0 else float("nan"),
    }
