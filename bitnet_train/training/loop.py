"""The pretraining loop, as components: an :class:`Evaluator` (validation loss of the ternary
model), :func:`train_step` (one optimizer step over ``grad_accum`` micro-batches),
:class:`StopSignal` (SIGINT/SIGTERM, or ``stop_after`` in tests, agreed on by every rank) and
:func:`train_loop`, which runs them on a :class:`~bitnet_train.training.run.Run` from its state to
``max_steps`` and checkpoints on the way.

Setting up (tokenizer, model, optimizer, objective, data, restoring a checkpoint) is
:func:`bitnet_train.training.run.open_run`'s; this module reads the Run it builds.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time

from bitnet_train.errors import TrainingError
from bitnet_train.training.schedule import lr_at, weight_decay_at


def _next_batch(blocks, batch_size: int, device):
    """The next ``batch_size`` blocks as one ``[batch_size, seq_len + 1]`` ``torch.long`` tensor on
    ``device``. Blocks are lists of ints (the streaming reader) or 1-D ``numpy`` arrays (the token
    shards' memory-map views, copied straight into the tensor's memory, pinned on CUDA)."""
    import numpy as np
    import torch

    rows = [next(blocks) for _ in range(batch_size)]
    if not isinstance(rows[0], np.ndarray):
        return torch.tensor(rows, dtype=torch.long, device=device)
    device = torch.device(device)
    out = torch.empty((batch_size, rows[0].shape[0]), dtype=torch.long, pin_memory=device.type == "cuda")
    np.stack(rows, out=out.numpy(), casting="safe")
    return out.to(device, non_blocking=True) if device.type != "cpu" else out


def _token_loss_sum(model, x):
    import torch.nn.functional as F

    logits = model(input_ids=x[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="sum")


class Evaluator:
    """Validation: mean next-token loss (nats/token) over the held-out windows
    (:class:`~bitnet_train.data.stream.HeldOut`, packed as ``bitnet-train eval`` packs), each rank
    scoring windows ``rank, rank + world, ...`` of the first ``limit`` (None: all), summed over
    ranks; None when there are none. ``bits_per_byte`` is set when every window was scored and the
    text's bytes are known: NLL / ln 2 / UTF-8 bytes, as ``eval`` reports it.

    The model is scored fully ternary (``quant_lambda`` 1, what ``eval``, ``export`` and stock
    transformers run) at every point of the quantization warm-up; the training λ is restored after."""

    def __init__(self, held_out, batch_size: int, acc, limit: int | None = None):
        wins = held_out.windows if limit is None else held_out.windows[:limit]
        self.complete = len(wins) == len(held_out.windows)
        self.n_bytes = held_out.n_bytes
        self.val = wins[acc.process_index :: acc.num_processes]
        self.batch_size, self.acc, self.bits_per_byte = batch_size, acc, None
        self.any = bool(wins)

    def __call__(self, model) -> float | None:
        import torch

        if not self.any:
            return None
        from bitnet_train.training.quant_warmup import fully_quantized

        acc = self.acc
        model.eval()
        total, n = 0.0, 0
        with torch.no_grad(), fully_quantized(model):
            i = 0
            while i < len(self.val):
                j = i + 1  # a batch of windows of one length (all but the last are seq_len + 1)
                while j < len(self.val) and j - i < self.batch_size and len(self.val[j]) == len(self.val[i]):
                    j += 1
                x = torch.tensor(self.val[i:j], dtype=torch.long, device=acc.device)
                total += _token_loss_sum(model, x).double().item()
                n += x[:, 1:].numel()
                i = j
        model.train()
        if acc.num_processes > 1:
            total, n = acc.reduce(torch.tensor([total, n], dtype=torch.float64, device=acc.device), "sum").tolist()
        if self.complete and self.n_bytes:
            self.bits_per_byte = total / math.log(2) / self.n_bytes
        return total / n


def train_step(run) -> tuple[dict, float]:
    """One optimizer step of ``run`` at ``run.state.step``: the quantization warm-up and the
    schedules for this step, ``grad_accum`` micro-batches of the objective's forward and backward,
    clipping, and the update (or, with ``train.non_finite: skip``, no update for a non-finite loss
    or gradient norm). Advances the state; returns the step's metrics record (with the
    objective's loss parts, averaged like the loss) and its (global mean) loss."""
    import torch

    from bitnet_train.training.distributed import clip_grad_norm, is_fsdp, set_gradient_sync
    from bitnet_train.training.quant_warmup import apply_warmup

    recipe, acc, model, opt, state = run.recipe, run.acc, run.model, run.opt, run.state
    t, world = recipe.train, acc.num_processes
    t0 = time.perf_counter()
    lam = apply_warmup(model, state.step, recipe.quant_warmup) if recipe.quant == "bitnet" else None
    lr, wd = lr_at(state.step, t), weight_decay_at(state.step, t)
    opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = lr
    opt.param_groups[0]["weight_decay"] = wd  # group 1 (vectors) is never decayed
    opt.zero_grad(set_to_none=True)
    fsdp = is_fsdp(model)
    sums: dict[str, float] = {}
    for i in range(t.grad_accum):
        x = _next_batch(run.blocks, t.batch_size, acc.device)
        # gradients are all-reduced (FSDP: reduce-scattered) across ranks only on the last micro-batch
        last = i == t.grad_accum - 1
        if fsdp:
            set_gradient_sync(model, last)
        with acc.no_sync(model) if not (last or fsdp) else contextlib.nullcontext():
            loss, parts = run.objective(model, x)
            acc.backward(loss / t.grad_accum)
        vals = torch.stack([loss.detach().float(), *(v.float() for v in parts.values())]).tolist()  # one sync
        for k, v in zip(("loss", *parts), vals):
            sums[k] = sums.get(k, 0.0) + v
    means = {k: v / t.grad_accum for k, v in sums.items()}
    if world > 1:
        reduced = acc.reduce(torch.tensor(list(means.values()), dtype=torch.float64, device=acc.device), "mean")
        means = dict(zip(means, reduced.tolist()))
    loss_val = means.pop("loss")
    problem = None if math.isfinite(loss_val) else f"non-finite loss {loss_val}"
    grad_norm = None
    if problem is None:  # with clip 0 the norm is only measured (scaled by 1: the gradients are unchanged)
        max_norm = t.clip if t.clip > 0 else math.inf
        grad_norm = clip_grad_norm(model, max_norm) if fsdp else float(acc.clip_grad_norm_(model.parameters(), max_norm))
        if not math.isfinite(grad_norm):
            problem = f"non-finite gradient norm {grad_norm}"
    if problem is not None and t.non_finite == "stop":
        raise TrainingError(f"{problem} at step {state.step + 1}; lower train.lr or check the data "
                            f"(train.non_finite: skip drops such steps instead)")
    if problem is None:
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)
        state.skipped_steps += 1
    tokens_per_step = t.batch_size * t.grad_accum * recipe.data.seq_len * world
    state.step += 1
    state.tokens += tokens_per_step
    dt = time.perf_counter() - t0
    rec = {"step": state.step, "loss": loss_val if problem is None else None, "lr": lr, "weight_decay": wd,
           "tokens": state.tokens, "tokens_per_s": round(tokens_per_step / dt if dt > 0 else 0.0, 1)}
    if lam is not None and lam < 1.0:
        rec["quant_lambda"] = lam
    if problem is None:
        rec.update(means)
    rec.update(run.objective.step_stats())
    if grad_norm is not None:
        rec["grad_norm"] = grad_norm
    if problem is not None:
        rec.update(skipped=problem, skipped_steps=state.skipped_steps)
    return rec, loss_val


class StopSignal:
    """SIGINT/SIGTERM (while installed, as a context manager) or ``stop_after`` steps ask the loop
    to save and stop; every rank must leave the loop at the same step, so they agree first."""

    def __init__(self, acc, stop_after: int | None):
        self.acc, self.stop_after, self.signum, self._old = acc, stop_after, None, {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def _on_signal(self, signum, _frame):
        self.signum = signum

    def __call__(self, step: int) -> bool:
        import torch

        flag = self.signum is not None or (self.stop_after is not None and step >= self.stop_after)
        if self.acc.num_processes > 1:
            flag = bool(self.acc.reduce(torch.tensor([int(flag)], device=self.acc.device), "sum").item())
        return flag


def _bpb(evaluate) -> dict:
    v = getattr(evaluate, "bits_per_byte", None)
    return {} if v is None else {"val_bits_per_byte": v}


def train_loop(run, stop: StopSignal, bar) -> dict:
    """Train ``run`` from its state to ``train.max_steps``: a step, its metrics, an evaluation
    every ``eval_every`` steps and at the end, a checkpoint (``run.save()``) every ``save_every``
    steps and at the end, and a stop (with a checkpoint) when ``stop`` says so. A fresh run
    evaluates once before the first step. Returns the summary; ``final/`` is the caller's."""
    t, state, evaluate, log = run.recipe.train, run.state, run.evaluate, run.log
    first_val = last_val = last_loss = None
    if run.fresh and t.eval_every:
        first_val = evaluate(run.model)
        if first_val is not None:
            log({"step": 0, "val_loss": first_val, **_bpb(evaluate)})
    interrupted = False
    while state.step < t.max_steps:
        rec, loss = train_step(run)
        step = state.step
        if "skipped" in rec:
            bar.write(f"step {step}: {rec['skipped']}; update skipped ({state.skipped_steps} so far)")
        else:
            last_loss = rec["loss"]
        log(rec)
        bar.update(1)
        post = {"loss": f"{loss:.3f}", "lr": f"{rec['lr']:.2e}", "tok/s": f"{rec['tokens_per_s']:,.0f}"}
        if "teacher_s" in rec:
            post["teacher"] = f"{rec['teacher_s']:.2f}s"
        if state.skipped_steps:
            post["skipped"] = state.skipped_steps
        bar.set_postfix(post)
        if (t.eval_every and step % t.eval_every == 0) or step == t.max_steps:
            last_val = evaluate(run.model)
            if last_val is not None:
                log({"step": step, "val_loss": last_val, **_bpb(evaluate)})
                bar.write(f"step {step}: val_loss {last_val:.4f}")
        if step % t.save_every == 0 or step == t.max_steps:
            run.save()
        if stop(step):
            interrupted = True
            if step % t.save_every and step != t.max_steps:
                run.save()
            break
    summary = {"step": state.step, "tokens": state.tokens, "loss": last_loss, "first_val_loss": first_val,
               "val_loss": last_val, "skipped_steps": state.skipped_steps, "world_size": run.acc.num_processes}
    if interrupted:
        summary["interrupted"] = True
    return summary
