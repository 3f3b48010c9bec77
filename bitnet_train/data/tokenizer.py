"""Tokenizers: a transformers tokenizer (hub name or local path), or a byte-level BPE built for
the run with `tokenizers` and saved with the checkpoint (so the tiny recipe needs no download)."""

from __future__ import annotations

from typing import Iterable

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"

# Used when a tokenizer has no chat template of its own (saved with every checkpoint).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + eos_token }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """A byte-level BPE trained on ``texts``, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def load_tokenizer(name_or_path, what: str | None = None, error: type[Exception] | None = None,
                   special_tokens: bool = True):
    """The one loader of a saved tokenizer: a transformers tokenizer from a hub name or a local
    directory, with a pad token and a chat template (the default one when it has none) unless
    ``special_tokens`` is False. When it cannot be loaded, ``error`` (default
    :class:`~bitnet_train.errors.ModelSpecError`) names ``what`` (default: the path) and the cause."""
    from transformers import AutoTokenizer

    from bitnet_train.errors import ModelSpecError

    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path))
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ... here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise (error or ModelSpecError)(f"{what or str(name_or_path)}: cannot load a tokenizer from it: {first}") from None
    return ensure_special_tokens(tok) if special_tokens else tok


def ensure_special_tokens(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(tok, "chat_template", None) is None:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok
