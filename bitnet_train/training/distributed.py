"""Building the model per rank, and the FSDP2 path of pretraining.

Meta-device build (:func:`materialize`): the model is built on the ``meta`` device (shapes only),
sharded if FSDP is on, then each rank allocates only what it holds (``to_empty``) and fills it
module by module: a module's parameters and buffers are initialised at full size on the CPU by
transformers' own ``_init_weights`` under a seed derived from ``(seed, module name)``, then the
rank keeps its shard (or the whole tensor without FSDP). The values depend only on the seed and
the module's name, not on the world size, the rank or the order of construction, so one process,
DDP and FSDP start from the same weights; no rank ever holds more than one module's full
parameters at a time.

FSDP2 (:func:`shard_model`): when ``accelerate launch`` is asked for FSDP (``--use_fsdp``, i.e.
``ACCELERATE_USE_FSDP=true`` in the environment, or an accelerate config with
``distributed_type: FSDP``) and its launcher started the process (``WORLD_SIZE`` set, a process
group formed; one process too, which then shards over a one-rank mesh), we apply torch's
``fully_shard`` to every decoder layer and then to the root ourselves, as torchtitan does:
accelerate does not shard on the CPU (it runs FSDP launches there as DDP), and on GPUs this keeps
one code path. accelerate still gives the process group, the device, ``backward`` and the
collectives of the loop; the model and optimizer do not go through ``accelerator.prepare``. bf16
on GPUs is FSDP2's ``MixedPrecisionPolicy`` (bf16 parameters and compute, fp32 gradient
reduction, fp32 master weights and optimizer state). The accelerate FSDP plugin's other options
(sharding strategy, wrap policy, CPU offload, FSDP version 1) are not read.

Sharded checkpoints (:mod:`bitnet_train.checkpoint.sharded`): under FSDP a checkpoint holds
``dcp/``, written by ``torch.distributed.checkpoint`` from ``get_state_dict(model, optimizer)``:
each rank writes its own shard of the model and the optimizer (``__R_0.distcp``), rank 0 the
``.metadata``; nothing is gathered. Loading reshards, so the checkpoint resumes at any world size,
with FSDP or without (one process, DDP).
"""

from __future__ import annotations

import hashlib
import os

from bitnet_train.checkpoint.sharded import tied_pairs
from bitnet_train.errors import CheckpointError



# ----------------------------------------------------------------------------- meta build


def module_seed(seed: int, name: str) -> int:
    """The seed a module is initialised under: from the run's seed and the module's name only."""
    d = hashlib.blake2b(f"bitnet-train init {int(seed)} {name}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") & ((1 << 63) - 1)


def _copy_into(target, full) -> None:
    """Copy the full tensor ``full`` into ``target``: all of it, or this rank's shard of a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(target.device)
    if isinstance(target, DTensor):
        local = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
        target.to_local().copy_(local)
    else:
        target.copy_(full)


def materialize(model, seed: int, device, params: bool = True) -> None:
    """Give a model built on the meta device (sharded or not) real storage on ``device`` and
    initialise it, module by module (see the module docstring). ``params=False`` initialises the
    buffers only (the rotary frequencies), for a model whose parameters a checkpoint then fills."""
    import torch
    import torch.nn as nn

    device = torch.device(device)
    tied = tied_pairs(model)
    model.to_empty(device=device)
    _retie(model, tied)
    done: set[int] = set()
    with torch.no_grad():
        for mname, m in model.named_modules():
            ps = [(k, p) for k, p in m._parameters.items() if params and p is not None and id(p) not in done]
            bs = [(k, b) for k, b in m._buffers.items() if b is not None]
            if not ps and not bs:
                continue
            saved_p, saved_b = dict(m._parameters), dict(m._buffers)
            try:
                for k, p in ps:
                    m._parameters[k] = nn.Parameter(torch.full(p.shape, float("nan"), dtype=p.dtype), requires_grad=False)
                for k, b in bs:
                    if not b.is_floating_point():
                        raise CheckpointError(f"{mname}.{k}: a non-float buffer the meta-device build cannot initialise")
                    m._buffers[k] = torch.full(b.shape, float("nan"), dtype=b.dtype)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(module_seed(seed, mname))
                    model._init_weights(m)
                    if hasattr(m, "init_buffers"):  # buffers a module defines from its own state (BitLinear's λ)
                        m.init_buffers()
                fresh = [(p, m._parameters[k], k) for k, p in ps] + [(b, m._buffers[k], k) for k, b in bs]
            finally:
                m._parameters.update(saved_p)
                m._buffers.update(saved_b)
            for target, full, k in fresh:
                if torch.isnan(full).any():
                    raise CheckpointError(f"{mname}.{k}: transformers' _init_weights left it uninitialised")
                _copy_into(target, full)
                done.add(id(target))


def _retie(model, pairs) -> None:
    """``to_empty`` gives each module its own tensor: share the tied ones again."""
    for dst, src in pairs:
        dmod, _, dk = dst.rpartition(".")
        smod, _, sk = src.rpartition(".")
        src_p = getattr(model.get_submodule(smod), sk)
        setattr(model.get_submodule(dmod), dk, src_p)


# ----------------------------------------------------------------------------- FSDP2


def fsdp_requested() -> bool:
    """Whether the launch asks for FSDP: ``accelerate launch --use_fsdp`` (or its config) sets
    ``ACCELERATE_USE_FSDP`` in every process's environment, and its launcher ``WORLD_SIZE`` (also
    ``--num_processes 1``: FSDP2 over a one-rank mesh, e.g. on one GPU). A process started
    without a launcher trains unsharded."""
    on = os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes", "on")
    try:
        world = int(os.environ.get("WORLD_SIZE", "0"))
    except ValueError:
        world = 0
    return on and world >= 1


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model, mixed_precision: str):
    """``fully_shard`` every decoder layer, then the root (embeddings, final norm and the head in
    one group). Parameters become DTensors sharded on dim 0 across the default process group."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision == "bf16" \
        else MixedPrecisionPolicy()
    layers = model.model.layers
    for i, layer in enumerate(layers):
        # the last layer's parameters are needed again at once by backward: keep them gathered
        fully_shard(layer, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    # FSDP2 gathers each layer's weight into the same unsharded tensor before every forward (same
    # object, storage and autograd version), so a weight-code cache keyed on it alone would serve
    # an older weight's codes (the loop's evaluation after an optimizer step): key it on the
    # sharded parameter too, which the optimizer step and a checkpoint load write in place
    for m in model.modules():
        if hasattr(m, "track_weight_source"):
            m.track_weight_source(m.weight)  # after fully_shard: the sharded DTensor parameter
    return model


def clip_grad_norm(model, max_norm: float) -> float:
    """The total gradient norm of a sharded model (all ranks' shards), clipped to ``max_norm``."""
    import torch
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def set_gradient_sync(model, on: bool) -> None:
    """FSDP2's ``no_sync``: reduce-scatter the gradients only on the last micro-batch."""
    model.set_requires_gradient_sync(on)
