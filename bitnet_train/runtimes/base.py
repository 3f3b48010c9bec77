"""What every runtime is: :class:`Runtime`, the methods export verification, ``eval`` and ``generate`` call.

A runtime is one model loaded in one engine (our forward, stock transformers, llama.cpp, ik_llama.cpp,
bitnet.cpp). Each engine is one class in this package; nothing outside it knows how an engine is driven.
"""

from __future__ import annotations

import os

import numpy as np

from bitnet_train.errors import UserError


class EngineError(UserError):
    """A runtime that is missing, cannot load the model or fails while running it; the message names
    the engine and the file."""


def default_threads() -> int:
    """Threads for an engine when none are given: the CPUs, at most 8 (more rarely helps these sizes)."""
    return max(1, min(os.cpu_count() or 1, 8))


class Runtime:
    """One model in one engine.

    - ``name``: the engine's name as reports print it; ``n_ctx``: the context this instance holds;
      ``eos``: the end-of-sequence id (None when the model has none).
    - ``tokenize(text, add_bos, special)``: the engine's own tokenizer (``add_bos``: its BOS policy for
      raw text, the model's; ``special``: parse special-token text as the tokens).
    - ``detokenize(ids)``; ``prefix_bytes(text, ids, k)``: UTF-8 bytes of ``text`` its first ``k`` ids cover.
    - ``logits(ids)``: float32 ``[len(ids), vocab]``, every position, from a fresh context.
    - ``probe(ids, text)``: the logits and the tokenization of ``text``, what export verification compares.
    - ``encode(texts)``: ids without special tokens, what ``eval`` scores.
    - ``nll(windows)``: each ``(seq, n_pred)`` window's summed NLL (:func:`bitnet_train.runtimes.nll.window_nll`).
    - ``complete(text, n, temperature, chat)``: a continuation and its speed (:func:`result`).
    - ``render(messages)``: the model's chat template applied, ready for ``complete(..., chat=True)``.
    """

    name = "?"
    n_ctx = 2048
    n_ctx_train: int | None = None  # the model's own context length, where the engine knows it
    train_seq_len: int | None = None  # the seq_len it was pretrained with, where a checkpoint says
    eos: int | None = None
    template: str | None = None  # the chat template (Jinja), None when the model has none
    special: dict = {}  # bos_token / eos_token text for the template

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        raise EngineError(f"{self.name} does not tokenize here")

    def detokenize(self, ids: list[int]) -> str:
        raise EngineError(f"{self.name} does not detokenize here")

    def prefix_bytes(self, text: str, ids: list[int], k: int) -> int:
        return len(self.detokenize(ids[:k]).encode("utf-8"))

    def logits(self, ids: list[int]) -> np.ndarray:
        raise EngineError(f"{self.name} gives no logits here")

    def probe(self, ids: list[int], text: str | None = None) -> tuple[np.ndarray, list[int] | None]:
        """What verification asks of a runtime: (:meth:`logits` of ``ids``, the runtime's tokenization
        of ``text`` with its own BOS policy, or None when no text is given)."""
        return self.logits(ids), (self.tokenize(text, add_bos=True, special=False) if text is not None else None)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids, no special tokens added (``eval`` scores documents so)."""
        return [self.tokenize(t, add_bos=False) for t in texts]

    def nll(self, windows: list[tuple[list[int], int]]) -> list[float]:
        from bitnet_train.runtimes.nll import window_nll

        return [window_nll(self.logits(seq[:-1]), seq, k) for seq, k in windows]

    def complete(self, text: str, n: int, temperature: float, chat: bool) -> dict:
        raise EngineError(f"{self.name} does not generate here")

    def render(self, messages: list[dict]) -> str:
        if not self.template:
            raise UserError(f"{self.name}: the model has no chat template (tokenizer.chat_template); --chat needs one")
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(conversations=[messages], chat_template=strip_generation_tags(
                self.template), add_generation_prompt=True, **self.special)
        except Exception as e:  # noqa: BLE001 - jinja raises many kinds
            raise UserError(f"the model's chat template failed to render: {e}") from None
        return rendered[0]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def strip_generation_tags(template: str) -> str:
    """transformers' ``{% generation %}`` markers (assistant masks for training) are not Jinja:
    runtimes reject them. Without them the template renders the same text."""
    import re

    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def check_fits(n_prompt: int, n_ctx: int) -> None:
    if n_prompt == 0:
        raise UserError("the prompt is empty")
    if n_prompt >= n_ctx:
        raise UserError(f"the prompt has {n_prompt} tokens; the model's context is {n_ctx}")


def sample(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0, else a draw from ``softmax(logits / temperature)``."""
    if temperature <= 0:
        return int(logits.argmax())
    p = np.exp((logits - logits.max()) / temperature)
    return int(rng.choice(len(p), p=p / p.sum()))


def result(runtime: str, text: str, n_prompt: int, n_new: int, prompt_s: float, decode_s: float,
           n_ctx: int) -> dict:
    """What ``complete`` returns: the text, token counts, times and the decode speed (new tokens per
    second, prompt processing excluded)."""
    return {
        "runtime": runtime,
        "text": text,
        "prompt_tokens": n_prompt,
        "new_tokens": n_new,
        "prompt_s": prompt_s,
        "decode_s": decode_s,
        "tokens_per_s": n_new / decode_s if decode_s > 0 else float("nan"),
        "n_ctx": n_ctx,
    }


def same_tokens(ours: list[int], theirs: list[int]) -> str:
    """Whether two tokenizations agree, in the words verification reports."""
    if ours == theirs:
        return f"identical ({len(ours)} tokens)"
    n = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return f"DIFFERS at token {n} ({len(ours)} vs {len(theirs)} tokens)"

