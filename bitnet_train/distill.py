"""What a training step minimises: the objective. :class:`TokenLoss` is next-token cross-entropy;
:class:`Distillation` adds a frozen full-precision teacher, as BitNet Distillation (arXiv
2510.13998) does when it makes a pretrained model ternary::

    loss = ce_weight * CE + kd_weight * KD + relation_weight * relation

* **KD**: KL(softmax(z_teacher / T) || softmax(z_student / T)) * T**2 at every position the
  cross-entropy counts, averaged over them.
* **relation** (MiniLM-v2's multi-head self-attention relations, one layer): the outputs of that
  layer's ``q_proj``, ``k_proj`` and ``v_proj`` (before RoPE), each re-split into
  ``relation_heads`` heads of ``width / relation_heads``; per head the relation is
  ``softmax(A @ A.T / sqrt(d))`` over all positions of the sequence; the loss is
  KL(teacher || student) averaged over heads and rows, summed over Q, K and V.

The recipe section is :class:`DistillConfig` (``distill:``); :func:`make_objective` builds the
objective of a run. The teacher is read from the recipe whenever a run starts (a resumed run reads
it again; it is never checkpointed), in eval mode with no gradients, replicated on every process
(under DDP and FSDP each rank holds a whole teacher).
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from .errors import RecipeError


@dataclass
class DistillConfig:
    """The ``distill:`` recipe section: distillation from a frozen teacher (off without ``teacher``)."""

    teacher: str | None = field(
        default=None, metadata={"help": "the teacher: hf:<dir or hub id> or a checkpoint/model directory; "
                                "null = no distillation"})
    ce_weight: float = field(default=1.0, metadata={"min": 0.0, "help": "weight of the next-token cross-entropy"})
    kd_weight: float = field(default=10.0, metadata={"min": 0.0, "help": "weight of the logits KL (x T^2)"})
    temperature: float = field(default=5.0, metadata={"min": 1e-3, "help": "softmax temperature T of the logits KL"})
    relation_weight: float = field(
        default=0.0, metadata={"min": 0.0, "help": "weight of the Q/K/V attention-relation KL of relation_layer (0 = off)"})
    relation_layer: int = field(
        default=-1, metadata={"help": "decoder layer whose relations are distilled (negative: from the end)"})
    relation_heads: int | None = field(
        default=None, metadata={"min": 1, "help": "relation heads Q, K and V are re-split into; default: the "
                                "student's attention heads"})
    teacher_dtype: str = field(
        default="auto", metadata={"choices": ("auto", "float32", "bfloat16"),
                                  "help": "the teacher's weights: auto = bfloat16 on a GPU, float32 on the CPU"})

    def validate(self):
        if self.teacher is not None and self.ce_weight == self.kd_weight == self.relation_weight == 0:
            raise RecipeError("distill: ce_weight, kd_weight and relation_weight are all 0; nothing would be trained")


def _ce(logits, labels):
    import torch.nn.functional as F

    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


class TokenLoss:
    """Next-token cross-entropy of a ``[batch, seq_len + 1]`` block: ``(loss, {})``."""

    def __call__(self, model, x):
        return _ce(model(input_ids=x[:, :-1]).logits, x[:, 1:]), {}

    def step_stats(self) -> dict:
        return {}


def kd_loss(student_logits, teacher_logits, temperature: float):
    """KL(softmax(teacher / T) || softmax(student / T)) * T**2, averaged over positions."""
    import torch.nn.functional as F

    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def relation_loss(student: dict, teacher: dict, heads: int):
    """MiniLM-v2 relation KL: for each of ``q``, ``k``, ``v`` (``[batch, seq, width]``, the widths
    of student and teacher may differ) the ``heads`` relation distributions
    ``softmax(A A^T / sqrt(width / heads))`` per position, KL(teacher || student) averaged over
    heads and positions; summed over the three."""
    import torch.nn.functional as F

    total = 0.0
    for name in ("q", "k", "v"):
        rels = []
        for a in (student[name], teacher[name]):
            b, n, w = a.shape
            d = w // heads
            a = a.float().reshape(b, n, heads, d).transpose(1, 2)  # [b, heads, n, d]
            rels.append(F.log_softmax(a @ a.transpose(-1, -2) / math.sqrt(d), dim=-1).reshape(-1, n))
        total = total + F.kl_div(rels[0], rels[1], log_target=True, reduction="batchmean")
    return total


class _Capture:
    """Forward hooks on one decoder layer's q/k/v projections that keep their outputs while
    ``active`` (a recomputation under activation checkpointing does not overwrite them then)."""

    def __init__(self, model, layer: int):
        attn = _layers(model)[layer].self_attn
        self.out, self.active = {}, False
        for name in ("q", "k", "v"):
            getattr(attn, f"{name}_proj").register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(_mod, _inp, output):
            if self.active:
                self.out[name] = output

        return hook

    @contextmanager
    def capturing(self):
        self.out, self.active = {}, True
        try:
            yield self.out
        finally:
            self.active = False


def _layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(getattr(l, "self_attn", None), f"{p}_proj") for l in layers for p in "qkv"):
        raise RecipeError(f"distill.relation_weight: {type(model).__name__} has no model.layers[i].self_attn."
                          "{q,k,v}_proj to take attention relations from")
    return layers


class Distillation:
    """The distillation objective for one run (see the module's docstring): ``(loss, parts)``
    with the parts ``loss_ce``, ``loss_kd``, ``loss_relation`` (detached, for the metrics)."""

    def __init__(self, cfg: DistillConfig, teacher, student):
        self.cfg, self.teacher = cfg, teacher
        self.heads = cfg.relation_heads or student.config.num_attention_heads
        self.teacher_seconds = 0.0
        self.rel = cfg.relation_weight > 0
        if self.rel:  # a negative layer counts from the end of each model
            self.s_cap, self.t_cap = _Capture(student, cfg.relation_layer), _Capture(teacher, cfg.relation_layer)

    def __call__(self, model, x):
        import torch

        inp, labels = x[:, :-1], x[:, 1:]
        t0 = time.perf_counter()
        with torch.no_grad(), (self.t_cap.capturing() if self.rel else _none()) as t_qkv:
            t_logits = self.teacher(input_ids=inp).logits
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        self.teacher_seconds += time.perf_counter() - t0
        with self.s_cap.capturing() if self.rel else _none() as s_qkv:
            logits = model(input_ids=inp).logits
        c = self.cfg
        ce = _ce(logits, labels)
        kd = kd_loss(logits, t_logits, c.temperature) if c.kd_weight > 0 else ce.new_zeros(())
        rel = relation_loss(s_qkv, t_qkv, self.heads) if self.rel else ce.new_zeros(())
        loss = c.ce_weight * ce + c.kd_weight * kd + c.relation_weight * rel
        return loss, {"loss_ce": ce.detach(), "loss_kd": kd.detach(), "loss_relation": rel.detach()}

    def step_stats(self) -> dict:
        """The teacher's forward time since the last call (seconds), then reset."""
        s, self.teacher_seconds = self.teacher_seconds, 0.0
        return {"teacher_s": round(s, 4)}


@contextmanager
def _none():
    yield {}


def load_teacher(cfg: DistillConfig, device):
    """The teacher of ``cfg``: frozen, eval mode, on ``device`` in ``teacher_dtype``."""
    import torch

    from .model import load_model

    dtype = cfg.teacher_dtype
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    spec = cfg.teacher
    teacher = load_model(spec, quant="none" if spec.startswith("hf:") else None, checkpoint_only=True,
                         what="distill.teacher", dtype=getattr(torch, dtype))
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def check_teacher(cfg: DistillConfig, teacher, student, tok) -> None:
    """Refuse, before training, a teacher the student cannot be distilled from: another
    vocabulary, a relation layer out of range, relation heads that do not divide the widths."""
    name = cfg.teacher
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise RecipeError(f"distill.teacher {name!r} has a vocabulary of {tv} tokens, the student {sv}: the logits "
                          "cannot be compared; distil from a teacher with the student's tokenizer")
    t_emb = teacher.get_input_embeddings().weight
    if len(tok) > t_emb.shape[0]:
        raise RecipeError(f"distill.teacher {name!r} has {t_emb.shape[0]} token embeddings, fewer than the "
                          f"{len(tok)} tokens of the run's tokenizer")
    if cfg.relation_weight <= 0:
        return
    n_s, n_t = len(_layers(student)), len(_layers(teacher))
    layer = cfg.relation_layer
    for who, n in (("student", n_s), ("teacher", n_t)):
        if not -n <= layer < n:
            raise RecipeError(f"distill.relation_layer {layer} is out of range: the {who} has {n} layers "
                              f"(0..{n - 1}, or -{n}..-1 from the end)")
    heads = cfg.relation_heads or student.config.num_attention_heads
    for who, m in (("student", student), ("teacher", teacher)):
        attn = _layers(m)[layer].self_attn
        for p in "qkv":
            w = getattr(attn, f"{p}_proj").out_features
            if w % heads:
                raise RecipeError(f"distill.relation_heads {heads} does not divide the {who}'s {p}_proj width {w} "
                                  f"(layer {layer}); choose a divisor of every Q/K/V width")


def _same_tokenizer(a, b) -> str | None:
    """Where two tokenizers differ (None when they encode alike), from their vocabularies."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])[:3]
        return f"vocabularies differ ({len(va)} vs {len(vb)} entries; e.g. {', '.join(repr(k) for k, _ in diff)})"
    probe = "Hello world: ternary weights, 1.58 bits\n  indented  text"
    if a(probe)["input_ids"] != b(probe)["input_ids"]:
        return "they encode the same text differently"
    return None


def make_objective(recipe, student, tok, device, announce: bool = True):
    """The objective of a run: :class:`TokenLoss`, or with ``distill.teacher`` set a
    :class:`Distillation` (the teacher loaded and checked against the student and its tokenizer;
    its size and, later, its time per step are reported)."""
    cfg = getattr(recipe, "distill", None)
    if cfg is None or cfg.teacher is None:
        return TokenLoss()
    if cfg.relation_weight > 0 and recipe.train.compile:
        raise RecipeError("distill.relation_weight takes Q/K/V through forward hooks, which train.compile does not "
                          "keep; set train.compile: false or distill.relation_weight: 0")
    teacher = load_teacher(cfg, device)
    check_teacher(cfg, teacher, student, tok)
    src = cfg.teacher[3:] if cfg.teacher.startswith("hf:") else cfg.teacher
    from .tokenizer import load_tokenizer

    try:
        t_tok = load_tokenizer(src)
    except Exception:  # noqa: BLE001 - a teacher directory without a tokenizer: the vocabulary check above stands
        t_tok = None
    if t_tok is not None:
        why = _same_tokenizer(t_tok, tok)
        if why:
            raise RecipeError(f"distill.teacher {cfg.teacher!r}: its tokenizer is not the run's ({why}); the "
                              "teacher's logits would score other tokens")
    if announce:
        n = sum(p.numel() for p in teacher.parameters())
        mb = sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**20
        print(f"pretrain: distilling from {cfg.teacher} ({n / 1e6:.1f}M parameters, {mb:,.0f} MiB of "
              f"{next(teacher.parameters()).dtype} weights on {device}); its forward time per step is logged as "
              "teacher_s", file=sys.stderr)
    return Distillation(cfg, teacher, student)
