"""The losses of distillation (:mod:`bitnet_train.training.distill` weighs and sums them): on the logits,
cross-entropy and the temperature-scaled KL to the teacher (:func:`logit_losses`), computed together a few
rows at a time, each row's softmax shared by both and their gradient made in the same pass, instead of one
pass of autograd over ``positions x vocab`` tensors per term; on one layer's Q/K/V, MiniLM-v2's attention
relations (:func:`relation_loss`)."""

from __future__ import annotations


def kd_loss(student_logits, teacher_logits, temperature: float, reduction: str = "mean"):
    """KL(softmax(teacher / T) || softmax(student / T)) * T**2 per position (``[..., vocab]``
    logits), averaged over positions (``reduction="sum"``: summed). Computed by
    :func:`logit_losses`, a block of rows at a time with its gradient."""
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v)
    kl, _, _ = logit_losses(s, teacher_logits.reshape(-1, v), temperature)  # total = the KL, with its gradient
    return kl if reduction == "sum" else kl / s.shape[0]


def logit_losses(logits, teacher_logits, temperature: float, labels=None, ce_weight: float = 0.0,
                 kd_weight: float = 1.0):
    """The losses on ``[rows, vocab]`` logits in one pass: ``(total, ce, kd)``, where ``ce`` is the
    summed next-token cross-entropy against ``labels`` (``-100``: not counted; 0 without labels),
    ``kd`` the summed T^2-scaled KL(softmax(teacher / T) || softmax(logits / T)) (0 with
    ``teacher_logits`` None) and ``total = ce_weight * ce + kd_weight * kd``, the only one with a
    gradient. Each block of ``KD_ROWS`` rows computes its softmaxes once, for both losses and the
    gradient (kept from the forward): the vocabulary-wide intermediates stay in cache instead of a
    dozen passes over ``rows x vocab`` tensors, and the cross-entropy needs no pass of its own."""
    t = None if teacher_logits is None else teacher_logits.detach()
    return _logit_function().apply(logits, t, None if labels is None else labels.reshape(-1), float(temperature),
                                   float(ce_weight), float(kd_weight))


def _logit_rows(s, t, labels, temperature: float, ce_weight: float, kd_weight: float, grad=None):
    """Summed CE and T^2-scaled KL of rows ``s`` (against ``labels`` and teacher rows ``t``); with
    ``grad`` (a float32 tensor shaped like ``s``) the gradient of ``ce_weight * CE + kd_weight * KL``
    with respect to ``s`` is written into it. Each op is one pass over the rows; the passes are few,
    in place where they can be, and the gradient is made where it is kept."""
    import torch

    s = s.float()
    ce = kd = s.new_zeros(())
    ls = p = None
    if labels is not None:  # masks, not indices: no host sync per block on a GPU
        counted = (labels != -100).unsqueeze(1)
        target = labels.clamp(min=0).unsqueeze(1)
        ls = torch.log_softmax(s, dim=-1)
        ce = -(ls.gather(1, target) * counted).sum()
    want_ce = grad is not None and labels is not None and ce_weight != 0
    want_kd = grad is not None and t is not None and kd_weight != 0
    if t is not None:
        T = temperature
        t = t / T if t.dtype == torch.float32 else t.float().div_(T)  # never in place on the teacher's logits
        lt = torch.log_softmax(t, dim=-1)
        pt = lt.exp()
        if T != 1 or ls is None:
            lsT = torch.log_softmax(s / T, dim=-1)
        else:  # at T = 1 the cross-entropy's log-softmax serves
            lsT = ls
        kd = torch.dot(pt.reshape(-1), lt.sub_(lsT).reshape(-1)) * T**2  # the KL summed over the block's rows
        if want_kd:  # d(T^2 KL)/ds = T (softmax(s/T) - softmax(t/T))
            torch.exp(lsT, out=grad).mul_(T * kd_weight).sub_(pt, alpha=T * kd_weight)
    if want_ce:  # d CE / ds = softmax(s) - onehot(label), on the counted rows
        p = ls.exp_().mul_(counted)  # ls is not needed after this
        if want_kd:
            grad.add_(p, alpha=ce_weight)
        else:
            torch.mul(p, ce_weight, out=grad)
        grad.scatter_add_(1, target, counted.to(grad.dtype) * -ce_weight)
    elif grad is not None and not want_kd:
        grad.zero_()
    return ce, kd


KD_ROWS = 8  # rows of logits per block of logit_losses
_LOGIT_FN = None


def _logit_function():
    """The autograd Function of :func:`logit_losses` (made on first use: this module imports no
    torch); the gradient of ``total`` is computed in the forward, ``KD_ROWS`` rows at a time."""
    global _LOGIT_FN
    if _LOGIT_FN is None:
        import torch

        class LogitLosses(torch.autograd.Function):
            @staticmethod
            def forward(ctx, s, t, labels, temperature, ce_weight, kd_weight):
                ce = torch.zeros((), dtype=torch.float32, device=s.device)
                kd = torch.zeros((), dtype=torch.float32, device=s.device)
                want = s.requires_grad
                grad = torch.empty(s.shape, dtype=torch.float32, device=s.device) if want else None
                for i in range(0, s.shape[0], KD_ROWS):
                    c, k = _logit_rows(s[i:i + KD_ROWS], None if t is None else t[i:i + KD_ROWS],
                                       None if labels is None else labels[i:i + KD_ROWS], temperature,
                                       ce_weight, kd_weight, grad[i:i + KD_ROWS] if want else None)
                    ce += c
                    kd += k
                ctx.save_for_backward(grad if want else torch.empty(0))
                ctx.dtype, ctx.done = s.dtype, False
                ctx.mark_non_differentiable(ce, kd)
                return ce_weight * ce + kd_weight * kd, ce, kd

            @staticmethod
            def backward(ctx, grad_out, _grad_ce, _grad_kd):
                # the gradient made in the forward is scaled in place (no second rows x vocab buffer), so a
                # second backward through the same graph (retain_graph) would be wrong: refused instead
                if ctx.done:
                    raise RuntimeError("logit_losses: backward twice through the same loss is not supported")
                ctx.done = True
                (grad,) = ctx.saved_tensors
                return grad.mul_(grad_out).to(ctx.dtype), None, None, None, None, None

        _LOGIT_FN = LogitLosses
    return _LOGIT_FN


def relation_loss(student: dict, teacher: dict, heads: int, attention_mask=None, similarity: str = "scaled_dot"):
    """MiniLM-v2 relation KL: for each of ``q``, ``k``, ``v`` (``[batch, seq, width]``, the widths
    of student and teacher may differ) the ``heads`` relation distributions
    ``softmax(A A^T / sqrt(width / heads))`` per position (``similarity="cosine"``: of the cosine
    similarities of A's rows), KL(teacher || student) averaged over heads and positions; summed over
    the three. With ``attention_mask`` (``[batch, seq]``, 0 = padding) padded positions are neither rows nor columns."""
    import torch

    total = 0.0
    keep = None if attention_mask is None else attention_mask.bool()
    for name in ("q", "k", "v"):
        rels = []
        for a in (student[name], teacher[name]):
            b, n, w = a.shape
            d = w // heads
            a = a.float().reshape(b, n, heads, d).transpose(1, 2)  # [b, heads, n, d]
            # cosine: unit rows, so that A A^T holds the cosines; scaled_dot: A A^T / sqrt(d), the scale split over both sides
            a = torch.nn.functional.normalize(a, dim=-1) if similarity == "cosine" else a / d ** 0.25
            scores = a @ a.transpose(-1, -2)
            if keep is not None:
                scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
            rels.append(torch.log_softmax(scores, dim=-1))
        s_rel, t_rel = rels
        kl = (t_rel.exp() * (t_rel - s_rel)).nan_to_num(0.0).sum(-1)  # [b, heads, n]; 0 * -inf -> 0 on padding
        if keep is None:
            total = total + kl.mean()
        else:
            rows = keep[:, None, :].expand_as(kl)
            total = total + kl[rows].sum() / rows.sum().clamp(min=1)
    return total
