"""``bitnet-train generate MODEL --prompt TEXT``: run an exported model on the CPU.

The runtime follows the file: a GGUF of architecture ``bitnet-25`` / ``bitnet-b1.58`` or holding
ik's ternary types (IQ1_BN, IQ2_BN, IQ2_BN_R4) runs in ik_llama.cpp (``ik-llama-cpp-python``), an
I2_S GGUF in bitnet.cpp (its ``llama-cli``, given ``--bitnet-cpp DIR`` or ``BITNET_CPP_DIR``), any
other ``.gguf`` in llama.cpp (``llama-cpp-python``); a directory (an ``export --format hf`` output,
or a checkpoint) runs in stock transformers. The context is the model's own length (the GGUF's
``<arch>.context_length``, the config's ``max_position_embeddings``). Greedy decoding by default;
prints the text and the decode speed (new tokens per second, prompt processing excluded).

``--chat`` wraps the prompt in the model's chat template (the tokenizer's, or the one stored in the
GGUF, rendered by transformers' Jinja renderer in every runtime) and prints only the answer. On a
terminal it keeps a multi-turn conversation (an empty line or end of input ends it); otherwise it
answers one turn: ``--prompt``, or all of standard input.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("generate", help="run an exported model (GGUF in llama.cpp or ik_llama.cpp, hf dir in "
                       "transformers) on the CPU")
    p.add_argument("model", help="a .gguf file or a model directory")
    p.add_argument("--prompt", help="the text to continue (with --chat: the first user message)")
    p.add_argument("--chat", action="store_true",
                   help="chat with the model through its chat template: a multi-turn loop on a terminal, one turn "
                   "(--prompt or standard input) otherwise")
    p.add_argument("--system", help="with --chat: a system message")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all)")
    p.add_argument("--bitnet-cpp", metavar="DIR",
                   help="a built bitnet.cpp checkout, to run I2_S files in (default: $BITNET_CPP_DIR)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from .errors import UserError

    if args.chat:
        return _chat_cli(args)
    if args.prompt is None:
        raise UserError("--prompt is required (or use --chat)")
    r = generate(args.model, args.prompt, args.max_new_tokens, args.temperature, args.threads, args.bitnet_cpp)
    print(r["text"])
    _report(r)
    return 0


def _report(r: dict) -> None:
    print(
        f"[{r['runtime']}] {r['new_tokens']} new tokens in {r['decode_s']:.2f} s: {r['tokens_per_s']:.1f} tokens/s "
        f"(prompt {r['prompt_tokens']} tokens in {r['prompt_s']:.2f} s)"
    )


def generate(
    model, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, threads: int | None = None,
    bitnet_cpp: str | None = None,
) -> dict:
    """Continue ``prompt`` (raw text, the tokenizer's own BOS policy)."""
    with open_runtime(model, threads, bitnet_cpp) as rt:
        r = rt.complete(prompt, max_new_tokens, temperature, chat=False)
    r["text"] = prompt + r["text"]
    return r


def chat(
    model, messages: list[dict], max_new_tokens: int = 64, temperature: float = 0.0, threads: int | None = None,
    bitnet_cpp: str | None = None,
) -> dict:
    """One assistant turn after ``messages`` (``[{"role", "content"}]``), through the chat template;
    ``text`` is the answer alone."""
    with open_runtime(model, threads, bitnet_cpp) as rt:
        return rt.complete(rt.render(messages), max_new_tokens, temperature, chat=True)


def _chat_cli(args) -> int:
    from .errors import UserError

    with open_runtime(args.model, args.threads, args.bitnet_cpp) as rt:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        if not sys.stdin.isatty():
            user = args.prompt if args.prompt is not None else sys.stdin.read().strip()
            if not user:
                raise UserError("--chat: no message (give --prompt or pipe one to standard input)")
            r = rt.complete(rt.render(messages + [{"role": "user", "content": user}]), args.max_new_tokens,
                            args.temperature, chat=True)
            print(r["text"])
            _report(r)
            return 0
        print(f"chatting with {args.model} in {rt.name} (an empty line or Ctrl-D ends)", file=sys.stderr)
        first = args.prompt
        while True:
            if first is not None:
                user, first = first, None
                print(f"you> {user}")
            else:
                try:
                    user = input("you> ")
                except EOFError:
                    print()
                    break
            if not user.strip():
                break
            messages.append({"role": "user", "content": user})
            r = rt.complete(rt.render(messages), args.max_new_tokens, args.temperature, chat=True)
            messages.append({"role": "assistant", "content": r["text"]})
            print(f"model> {r['text']}")
            print(f"  [{r['runtime']}] {r['new_tokens']} tokens, {r['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------
# runtimes
# ----------------------------------------------------------------------------------------------


def open_runtime(model, threads: int | None = None, bitnet_cpp: str | None = None) -> "_Runtime":
    """The runtime for ``model``, chosen from what it is (see the module docstring)."""
    from .errors import UserError
    from .export.gguf import I2S_FILE_TYPE
    from .export.verify import bitnet_cpp_dir

    p = Path(model)
    if p.is_file() and p.suffix == ".gguf":
        with open(p, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise UserError(f"{model}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); truncated or not an export?")
        from .export import ik

        if ik.is_ik_file(p):
            return _Ik(p, threads)
        if gguf_file_type(p) == I2S_FILE_TYPE:
            root = bitnet_cpp_dir(bitnet_cpp)
            if root is None:
                raise UserError(
                    f"{model} is an I2_S GGUF, which only bitnet.cpp runs (llama.cpp has no I2_S type): "
                    "pass --bitnet-cpp DIR (or set BITNET_CPP_DIR) to a built bitnet.cpp checkout"
                )
            return _BitnetCpp(root, p, threads)
        return _Llama(p, threads)
    if p.is_dir():
        return _Transformers(p, threads)
    raise UserError(f"{model}: not a .gguf file or a model directory")


def gguf_file_type(path: Path) -> int | None:
    """``general.file_type`` of a GGUF, read from its metadata (the ``gguf`` package's reader
    stops at tensor types it does not know, such as I2_S's; :func:`ik.read_header` skips them)."""
    from .export.ik import read_header

    v = read_header(path)[0].get("general.file_type")
    return int(v) if v is not None else None


class _Runtime:
    """``render(messages)`` -> prompt text; ``complete(text, n, temperature, chat)`` -> result dict."""

    name = "?"
    template: str | None = None
    special: dict = {}

    def render(self, messages: list[dict]) -> str:
        from .errors import UserError

        if not self.template:
            raise UserError(f"{self.name}: the model has no chat template (tokenizer.chat_template); --chat needs one")
        from transformers.utils.chat_template_utils import render_jinja_template

        from .export.gguf import strip_generation_tags

        try:
            rendered, _ = render_jinja_template(conversations=[messages], chat_template=strip_generation_tags(
                self.template), add_generation_prompt=True, **self.special)
        except Exception as e:  # noqa: BLE001 - jinja raises many kinds
            raise UserError(f"the model's chat template failed to render: {e}") from None
        return rendered[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        pass


def _check_fits(n_prompt: int, n_new: int, n_ctx: int) -> None:
    from .errors import UserError

    if n_prompt >= n_ctx:
        raise UserError(f"the prompt has {n_prompt} tokens; the model's context is {n_ctx}")


class _Gguf(_Runtime):
    def _meta_chat(self, path: Path, tokens) -> None:
        from .export.ik import read_header

        meta = read_header(path, keys=("tokenizer.chat_template", "tokenizer.ggml.bos_token_id",
                                       "tokenizer.ggml.eos_token_id"))[0]
        self.template = meta.get("tokenizer.chat_template")
        self.special = {}
        for name in ("bos", "eos"):
            i = meta.get(f"tokenizer.ggml.{name}_token_id")
            if i is not None:
                self.special[f"{name}_token"] = tokens(int(i))


class _Llama(_Gguf):
    name = "llama.cpp"

    def __init__(self, path: Path, threads: int | None):
        from .errors import UserError

        try:
            import llama_cpp
        except ImportError:
            raise UserError("running a GGUF needs llama-cpp-python: pip install 'bitnet-train[llama]'") from None
        import os

        # n_ctx=0: the model's context length (llama.cpp reads <arch>.context_length)
        try:
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=0, n_threads=threads or os.cpu_count(),
                                       verbose=False)
        except ValueError as e:
            raise UserError(f"llama.cpp cannot load {path}: {e}") from None
        self.n_ctx = self.llm.n_ctx()
        self._meta_chat(path, lambda i: self.llm.detokenize([i], special=True).decode("utf-8", errors="replace"))

    def complete(self, text: str, n: int, temperature: float, chat: bool) -> dict:
        llm = self.llm
        # raw text: BOS only if the GGUF asks; a rendered chat carries its own special tokens
        ids = llm.tokenize(text.encode("utf-8"), add_bos=not chat, special=True)
        if not ids:
            from .errors import UserError

            raise UserError("the prompt is empty")
        _check_fits(len(ids), n, self.n_ctx)
        n = min(n, self.n_ctx - len(ids))
        llm.reset()
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
        r = _result(self.name, llm.detokenize(out).decode("utf-8", errors="replace"), len(ids), len(out),
                    t1 - t0, t2 - t1)
        r["n_ctx"] = self.n_ctx
        return r

    def close(self) -> None:
        self.llm.close()


class _Ik(_Gguf):
    name = "ik_llama.cpp"

    def __init__(self, path: Path, threads: int | None):
        from .errors import UserError
        from .export import ik

        if not ik.available():
            raise UserError(f"{path} is an ik_llama.cpp GGUF (ReLU² bitnet-25 graph or IQ*_BN types): "
                            f"pip install '{ik.WHEEL}>=0.1.5' (or 'bitnet-train[ik]')")
        import os

        try:
            self.rt = ik.IkRuntime(path, threads=threads or os.cpu_count())  # n_ctx: the model's
        except ik.ExportError as e:
            raise UserError(str(e)) from None
        self.n_ctx = self.rt.n_ctx
        self._meta_chat(path, lambda i: self.rt.detokenize_special(i))

    def complete(self, text: str, n: int, temperature: float, chat: bool) -> dict:
        import numpy as np

        rt = self.rt
        ids = rt.tokenize(text, add_bos=not chat, special=True)
        if not ids:
            from .errors import UserError

            raise UserError("the prompt is empty")
        _check_fits(len(ids), n, self.n_ctx)
        n = min(n, self.n_ctx - len(ids))
        rng = np.random.default_rng()
        rt.reset()
        t0 = time.perf_counter()
        logits = rt.eval(ids)[-1]
        t1 = time.perf_counter()
        out: list[int] = []
        for _ in range(n):
            if temperature > 0:
                p = np.exp((logits - logits.max()) / temperature)
                tok = int(rng.choice(len(p), p=p / p.sum()))
            else:
                tok = int(logits.argmax())
            if rt.is_eog(tok):
                break
            out.append(tok)
            logits = rt.eval([tok])[-1]
        t2 = time.perf_counter()
        r = _result(self.name, rt.detokenize(out), len(ids), len(out), t1 - t0, t2 - t1)
        r["n_ctx"] = self.n_ctx
        return r

    def close(self) -> None:
        self.rt.close()


class _BitnetCpp(_Gguf):
    """bitnet.cpp's ``llama-cli`` on the file; speeds from its own timing report."""

    name = "bitnet.cpp"

    def __init__(self, root: Path, path: Path, threads: int | None):
        from .errors import UserError
        from .export.ik import read_header
        from .export.verify import bitnet_cpp_program

        try:
            self.cli = bitnet_cpp_program(root, "llama-cli")
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
        self.path, self.threads = path, threads
        arch = read_header(path, keys=("general.architecture",))[0].get("general.architecture")
        self.n_ctx = int(read_header(path, keys=(f"{arch}.context_length",))[0].get(f"{arch}.context_length") or 2048)

    def render(self, messages: list[dict]) -> str:
        if self.template is None:  # read on first use: the token list of a big vocabulary takes seconds
            from .export.ik import read_header

            toks = read_header(self.path, keys=("tokenizer.ggml.tokens",))[0].get("tokenizer.ggml.tokens") or []
            self._meta_chat(self.path, lambda i: toks[i] if i < len(toks) else "")
        return super().render(messages)

    def complete(self, text: str, n: int, temperature: float, chat: bool) -> dict:
        import os
        import re
        import subprocess

        from .errors import UserError

        cli = self.cli
        cmd = [str(cli), "-m", str(self.path), "-p", text, "-n", str(n), "--temp", str(temperature), "-s", "0",
               "-t", str(self.threads or os.cpu_count() or 1), "-c", str(self.n_ctx), "--simple-io"]
        help_text = subprocess.run([str(cli), "--help"], capture_output=True, text=True).stdout
        if "-no-cnv" in help_text:
            cmd.append("-no-cnv")  # newer builds chat by default when the file has a chat template
        if chat and "--no-display-prompt" in help_text:
            cmd.append("--no-display-prompt")
        r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise UserError(f"bitnet.cpp's llama-cli failed on {self.path} (exit {r.returncode}): "
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
        res = _result(self.name, out, n_prompt, max(sampled - n_prompt, 0), prompt_s, decode_s)
        res["tokens_per_s"] = steps / decode_s if steps and decode_s > 0 else float("nan")  # per decode step
        res["n_ctx"] = self.n_ctx
        return res


class _Transformers(_Runtime):
    name = "transformers"

    def __init__(self, path: Path, threads: int | None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.template = getattr(self.tok, "chat_template", None)
        self.special = {k: getattr(self.tok, k) for k in ("bos_token", "eos_token") if getattr(self.tok, k, None)}
        with torch._dynamo.config.patch(disable=True):  # transformers' BitNet kernels are torch.compile'd
            self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        self.n_ctx = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    def complete(self, text: str, n: int, temperature: float, chat: bool) -> dict:
        import torch

        tok = self.tok
        # raw text: the tokenizer's own BOS policy (as llama.cpp follows the GGUF's); a rendered
        # chat already holds its special tokens
        ids = tok(text, return_tensors="pt", add_special_tokens=not chat)["input_ids"]
        _check_fits(ids.shape[1], n, self.n_ctx)
        n = min(n, self.n_ctx - ids.shape[1])
        with torch._dynamo.config.patch(disable=True), torch.no_grad():
            t0 = time.perf_counter()
            outp = self.model(ids, use_cache=True)
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
                outp = self.model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past, logits = outp.past_key_values, outp.logits[0, -1]
            t2 = time.perf_counter()
        r = _result(self.name, tok.decode(new), ids.shape[1], len(new), t1 - t0, t2 - t1)
        r["n_ctx"] = self.n_ctx
        return r


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
