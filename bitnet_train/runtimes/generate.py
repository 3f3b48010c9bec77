"""``bitnet-train generate MODEL --prompt TEXT``: run an exported model on the CPU.

The runtime follows the file (:func:`bitnet_train.runtimes.engine_for`): a GGUF of architecture
``bitnet-25`` / ``bitnet-b1.58`` or holding ik's ternary types (IQ1_BN, IQ2_BN, IQ2_BN_R4) runs in
ik_llama.cpp (``ik-llama-cpp-python``), an I2_S GGUF in bitnet.cpp (its ``llama-cli``, given
``--bitnet-cpp DIR`` or ``BITNET_CPP_DIR``), any other ``.gguf`` in llama.cpp (``llama-cpp-python``); an
``export --format hf`` directory in stock transformers, a checkpoint in our forward. The context is the
model's own length (the GGUF's ``<arch>.context_length``, the config's ``max_position_embeddings``). Greedy decoding by default;
prints the text and the decode speed (new tokens per second, prompt processing excluded).

``--chat`` wraps the prompt in the model's chat template (the tokenizer's, or the one stored in the
GGUF, rendered by transformers' Jinja renderer in every runtime) and prints only the answer. On a
terminal it keeps a multi-turn conversation (an empty line or end of input ends it); otherwise it
answers one turn: ``--prompt``, or all of standard input.
"""

from __future__ import annotations

import sys


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
    from bitnet_train.errors import UserError

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
    from bitnet_train.errors import UserError

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


def open_runtime(model, threads: int | None = None, bitnet_cpp: str | None = None):
    """``model`` in the engine that computes it (:func:`bitnet_train.runtimes.engine_for`), with every CPU
    thread unless ``threads`` says otherwise."""
    import os

    from bitnet_train.runtimes import open_model

    return open_model(model, threads=threads or os.cpu_count(), bitnet_cpp=bitnet_cpp)
