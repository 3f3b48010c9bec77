"""What a training step minimises: the objective. :class:`TokenLoss` is next-token cross-entropy;
:class:`Distillation` adds a frozen full-precision teacher, as BitNet Distillation (arXiv
2510.13998) does when it makes a pretrained model ternary::

    loss = ce_weight * CE + kd_weight * KD + relation_weight * relation

* **KD**: KL(softmax(z_teacher / T) || softmax(z_student / T)) * T**2 at every position the
  cross-entropy counts, averaged over them.
* **relation** (MiniLM-v2's multi-head self-attention relations, one layer): the outputs of that
  layer's ``q_proj``, ``k_proj`` and ``v_proj`` (before RoPE), each re-split into
  ``relation_heads`` heads of ``width / relation_heads``; per head the relation is
  ``softmax(A @ A.T / sqrt(d))`` over all positions of the sequence (``relation_similarity: cosine``:
  of A's rows' cosine similarities, as the public BitNet Distillation code computes it); the loss is
  KL(teacher || student) averaged over heads and rows, summed over Q, K and V.

The losses themselves are :mod:`bitnet_train.training.distill_losses`.

The recipe section is :class:`DistillConfig` (``distill:``, in ``pretrain`` and ``sft`` recipes);
:func:`make_objective` builds the objective of a run (the pretraining loop calls it on each block;
the SFT trainer, :mod:`bitnet_train.align.trainer`, uses its teacher and student forwards and
:meth:`Distillation.loss` over the tokens TRL's loss counts). The teacher is read from the recipe whenever a run starts (a resumed run reads
it again; it is never checkpointed), in eval mode with no gradients, replicated on every process
(under DDP and FSDP each rank holds a whole teacher).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from bitnet_train.errors import RecipeError
from bitnet_train.training.distill_losses import logit_losses, relation_loss


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
    relation_heads: int | None = field(default=None, metadata={"min": 1, "help": (
        "relation heads Q, K and V are re-split into; default: the student's key/value heads")})
    relation_similarity: str = field(default="scaled_dot", metadata={"choices": ("scaled_dot", "cosine"), "help": (
        "the relation's scores: scaled_dot = A A^T / sqrt(d) (MiniLM-v2); cosine = the cosine similarities of A's rows "
        "(the public BitNet Distillation code)")})
    teacher_dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "bfloat16"), "help": (
        "the teacher's weights: auto = bfloat16 on a GPU and on a CPU with AVX-512 BF16 or AMX, float32 elsewhere")})

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


def default_relation_heads(student) -> int:
    """The student's key/value heads: they divide its Q width and its K/V widths (with GQA the
    attention heads do not divide K and V)."""
    c = student.config
    return getattr(c, "num_key_value_heads", None) or c.num_attention_heads


class Distillation:
    """The distillation objective for one run (see the module's docstring). Called on a
    pretraining block it returns ``(loss, parts)`` with the parts ``loss_ce``, ``loss_kd``,
    ``loss_relation`` (detached, for the metrics); :meth:`teacher_forward`, :meth:`student_forward`
    and :meth:`loss` serve a trainer that picks the positions that count itself (SFT)."""

    def __init__(self, cfg: DistillConfig, teacher, student):
        self.cfg, self.teacher = cfg, teacher
        self.heads = cfg.relation_heads or default_relation_heads(student)
        self.teacher_seconds = 0.0
        self.teacher_bytes = 0  # the most the teacher's outputs held at once since the last step_stats
        self.rel = cfg.relation_weight > 0
        if self.rel:  # a negative layer counts from the end of each model
            self.s_cap, self.t_cap = _Capture(student, cfg.relation_layer), _Capture(teacher, cfg.relation_layer)

    def teacher_forward(self, **inputs):
        """The teacher's logits and (with relations) Q/K/V, without gradients; its time is counted."""
        import torch

        t0 = time.perf_counter()
        with torch.no_grad(), (self.t_cap.capturing() if self.rel else _none()) as qkv:
            logits = self.teacher(**inputs).logits
        if logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        self.teacher_seconds += time.perf_counter() - t0
        # what the teacher adds to the step's memory: its logits and Q/K/V, held until the loss is computed
        # (its weights are counted once, at the start; its activations are freed inside the no-grad forward)
        held = sum(t.numel() * t.element_size() for t in (logits, *qkv.values()))
        self.teacher_bytes = max(self.teacher_bytes, held)
        return logits, qkv

    def student_forward(self, model, **inputs):
        with self.s_cap.capturing() if self.rel else _none() as qkv:
            logits = model(**inputs).logits
        return logits, qkv

    def loss(self, logits, t_logits, labels, s_qkv, t_qkv, divisor=None, rel_scale=1.0, attention_mask=None):
        """``ce_weight * CE + kd_weight * KD + relation_weight * relation`` and the detached parts.
        ``logits`` / ``t_logits`` hold the positions (``[n, vocab]`` or ``[b, s, vocab]``) and
        ``labels`` their next tokens (``-100``: no cross-entropy there); CE and KD are summed over
        them in one pass (:func:`logit_losses`) and divided by ``divisor`` (default: the number of
        counted labels); the relation KL is scaled by ``rel_scale``. A trainer that normalises over
        a whole accumulated batch passes that batch's count as ``divisor`` and this micro-batch's
        share of it as ``rel_scale``."""
        c = self.cfg
        v = logits.shape[-1]
        labels = labels.reshape(-1)
        n = divisor if divisor is not None else (labels != -100).sum().clamp(min=1)
        teacher = t_logits.reshape(-1, v) if c.kd_weight > 0 else None
        total, ce, kd = logit_losses(logits.reshape(-1, v), teacher, c.temperature, labels, c.ce_weight / n,
                                     c.kd_weight / n)
        ce, kd = ce / n, kd / n
        rel = relation_loss(s_qkv, t_qkv, self.heads, attention_mask, c.relation_similarity) if self.rel else ce.new_zeros(())
        rel = rel * rel_scale
        total = total + c.relation_weight * rel
        return total, {"loss_ce": ce.detach(), "loss_kd": kd.detach(), "loss_relation": rel.detach()}

    def __call__(self, model, x):
        inp = x[:, :-1]
        t_logits, t_qkv = self.teacher_forward(input_ids=inp)
        logits, s_qkv = self.student_forward(model, input_ids=inp)
        return self.loss(logits, t_logits, x[:, 1:], s_qkv, t_qkv)

    def step_stats(self) -> dict:
        """The teacher's cost since the last call, then reset: its forward time (``teacher_s``, seconds)
        and the memory its outputs held at once (``teacher_mib``: logits and Q/K/V, the largest micro-batch's)."""
        s, self.teacher_seconds = self.teacher_seconds, 0.0
        b, self.teacher_bytes = self.teacher_bytes, 0
        return {"teacher_s": round(s, 4), "teacher_mib": round(b / 2**20, 2)}


@contextmanager
def _none():
    yield {}


def bf16_is_fast(device) -> bool:
    """Whether bfloat16 matmuls run natively on ``device``: CUDA GPUs, and CPUs with AVX-512 BF16 or
    AMX, where a bfloat16 teacher's forward measured well under its float32 one's at the same bits per
    byte; on a CPU without them bfloat16 matmuls are emulated, several times slower than float32
    (both measured in docs/performance.md)."""
    import torch

    dev = torch.device(device).type
    if dev == "cuda":
        return True
    from bitnet_train.cpu_features import cpu_features

    return dev == "cpu" and bool({"AVX-512 BF16", "AMX"} & set(cpu_features()))


def teacher_dtype(cfg: DistillConfig, device) -> str:
    """The dtype the teacher of ``cfg`` is loaded in on ``device`` (``auto`` resolved)."""
    if cfg.teacher_dtype != "auto":
        return cfg.teacher_dtype
    return "bfloat16" if bf16_is_fast(device) else "float32"


def load_teacher(cfg: DistillConfig, device):
    """The teacher of ``cfg``: frozen, eval mode, on ``device`` in :func:`teacher_dtype`."""
    import torch

    from bitnet_train.modeling.models import load_model

    dtype = teacher_dtype(cfg, device)
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
    heads = cfg.relation_heads or default_relation_heads(student)
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


def make_objective(recipe, student, tok, device, announce: bool = True, stage: str = "pretrain"):
    """The objective of a run: :class:`TokenLoss`, or with ``distill.teacher`` set a
    :class:`Distillation` (the teacher loaded and checked against the student and its tokenizer;
    its size and, later, its time per step are reported)."""
    cfg = getattr(recipe, "distill", None)
    if cfg is None or cfg.teacher is None:
        return TokenLoss()
    if cfg.relation_weight > 0 and getattr(recipe.train, "compile", False):
        raise RecipeError("distill.relation_weight takes Q/K/V through forward hooks, which train.compile does not "
                          "keep; set train.compile: false or distill.relation_weight: 0")
    teacher = load_teacher(cfg, device)
    check_teacher(cfg, teacher, student, tok)
    src = cfg.teacher[3:] if cfg.teacher.startswith("hf:") else cfg.teacher
    from bitnet_train.data.tokenizer import load_tokenizer

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
        print(f"{stage}: distilling from {cfg.teacher} ({n / 1e6:.1f}M parameters, {mb:,.0f} MiB of "
              f"{next(teacher.parameters()).dtype} weights on {device}); per step its forward time is logged as "
              "teacher_s and the memory its outputs hold as teacher_mib", file=sys.stderr)
    return Distillation(cfg, teacher, student)
