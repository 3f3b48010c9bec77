"""A model directory run by torch: a bitnet-train checkpoint through our forward (:class:`OurForward`,
what the trainer computes), or a directory in stock transformers (:class:`StockTransformers`: a packed
``export --format hf`` output, or any checkpoint, with no bitnet-train code in the forward).

Both are transformers models with the tokenizer saved beside them, so everything but loading is shared
(:class:`TorchModel`). transformers' packed BitNet layers are ``torch.compile``'d; the eager path computes
the same function without the compiler (or a C toolchain), so dynamo is disabled around every call.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path

import numpy as np

from bitnet_train.errors import UserError
from bitnet_train.runtimes.base import Runtime, check_fits, result


class TorchModel(Runtime):
    """A transformers causal LM and its tokenizer (``self.model``, ``self.tok``), batched ``nll``."""

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 8, threads: int | None = None):
        import torch
        from transformers import AutoTokenizer

        self.path, self.device, self.batch = Path(path), device, max(1, batch_size)
        if threads:
            torch.set_num_threads(threads)
        if not any((self.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise UserError(f"{self.path}: holds no tokenizer (tokenizer.json); it is needed to run the model")
        self.tok = AutoTokenizer.from_pretrained(str(self.path))  # the model's own (its template or none)
        self.eos = self.tok.eos_token_id
        self.template = getattr(self.tok, "chat_template", None)
        self.special = {k: getattr(self.tok, k) for k in ("bos_token", "eos_token") if getattr(self.tok, k, None)}
        with torch._dynamo.config.patch(disable=True):
            self.model = self._load().to(device).eval()
        self.n_ctx = int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)
        try:  # what pretraining wrote beside the weights
            self.train_seq_len = int(json.loads((self.path / "bitnet_train.json").read_text())["recipe"]["data"]["seq_len"])
        except (OSError, KeyError, TypeError, ValueError):
            self.train_seq_len = None

    def _load(self):
        raise NotImplementedError

    # -- tokens ---------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """``add_bos``: the tokenizer's own special-token policy; special-token text is always parsed."""
        return list(self.tok(text, add_special_tokens=add_bos)["input_ids"])

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def prefix_bytes(self, text: str, ids: list[int], k: int) -> int:
        if getattr(self.tok, "is_fast", False):
            end = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"][k - 1][1]
            return len(text[:end].encode("utf-8"))
        return len(self.tok.decode(ids[:k], clean_up_tokenization_spaces=False).encode("utf-8"))

    # -- logits ---------------------------------------------------------------------------------
    def logits(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad(), torch._dynamo.config.patch(disable=True):
            return self.model(torch.tensor([ids], device=self.device)).logits[0].float().cpu().numpy()

    def nll(self, windows: list[tuple[list[int], int]]) -> list[float]:
        import torch

        from bitnet_train.runtimes.nll import window_nll

        out, pad = [], self.eos if self.eos is not None else 0
        with torch.no_grad(), torch._dynamo.config.patch(disable=True):
            for s in range(0, len(windows), self.batch):
                part = windows[s : s + self.batch]
                x = torch.full((len(part), max(len(w) for w, _ in part) - 1), pad, dtype=torch.long)
                for r, (seq, _) in enumerate(part):  # right padding: a row's real positions come first
                    x[r, : len(seq) - 1] = torch.tensor(seq[:-1])
                logits = self.model(x.to(self.device)).logits.float().cpu().numpy()
                out += [window_nll(logits[r], seq, k) for r, (seq, k) in enumerate(part)]
        return out

    # -- generation -----------------------------------------------------------------------------
    def complete(self, text: str, n: int, temperature: float, chat: bool) -> dict:
        import torch

        # raw text: the tokenizer's own BOS policy (as llama.cpp follows the GGUF's); a rendered
        # chat already holds its special tokens
        ids = torch.tensor([self.tokenize(text, add_bos=not chat)], device=self.device)
        check_fits(ids.shape[1], self.n_ctx)
        n = min(n, self.n_ctx - ids.shape[1])
        # transformers renamed the KV cache's argument and output field `past_key_values` to `cache`
        # (5.23 takes the old name; 5.25 deprecates it, to be removed in 5.40): the name this forward takes
        key = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        with torch._dynamo.config.patch(disable=True), torch.no_grad():
            t0 = time.perf_counter()
            outp = self.model(ids, use_cache=True)
            past = outp[key]
            t1 = time.perf_counter()
            logits = outp.logits[0, -1]
            new = []
            for _ in range(n):
                if temperature > 0:
                    nxt = int(torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1))
                else:
                    nxt = int(logits.argmax())
                if nxt == self.eos:
                    break
                new.append(nxt)
                outp = self.model(torch.tensor([[nxt]], device=self.device), **{key: past}, use_cache=True)
                past, logits = outp[key], outp.logits[0, -1]
            t2 = time.perf_counter()
        return result(self.name, self.tok.decode(new), ids.shape[1], len(new), t1 - t0, t2 - t1, self.n_ctx)


class OurForward(TorchModel):
    """A bitnet-train checkpoint (or converted model) with :class:`~bitnet_train.layers.bitlinear.BitLinear`
    where it is ternary: the forward the trainer ran. ``backend``: BitLinear's (``torch`` is the
    reference; ``auto`` takes Triton on a GPU)."""

    name = "bitnet-train"

    def __init__(self, path, device: str = "cpu", batch_size: int = 8, threads: int | None = None,
                 backend: str = "auto"):
        self.backend = backend
        super().__init__(path, device, batch_size, threads)

    def _load(self):
        from bitnet_train.modeling.models import load_model

        return load_model(self.path, backend=self.backend)


class StockTransformers(TorchModel):
    """The directory loaded by ``AutoModelForCausalLM.from_pretrained`` alone, in fp32."""

    name = "transformers"

    def _load(self):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(self.path), dtype=torch.float32)


def is_packed(path: str | Path) -> bool:
    """A packed BitNet directory (transformers' ``offline`` layout: 2-bit weights, no latent ones)."""
    from bitnet_train.checkpoint.format import read_config_json

    qc = read_config_json(Path(path)).get("quantization_config") or {}
    return qc.get("quant_method") == "bitnet" and qc.get("quantization_mode", "offline") != "online"
