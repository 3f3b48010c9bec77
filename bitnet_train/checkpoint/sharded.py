"""Sharded checkpoints (FSDP2): every rank writes its shard of the model and the optimizer into a
checkpoint's ``dcp/`` with ``torch.distributed.checkpoint``, and reads them back at any world size;
and the whole model gathered one parameter at a time for ``final/``. Used by
:class:`~bitnet_train.checkpoint.checkpointer.Checkpointer` and by the meta-device build of a run."""

from __future__ import annotations

from pathlib import Path

from bitnet_train.errors import CheckpointError

DCP_DIR = "dcp"  # inside a sharded checkpoint: the model's and optimizer's shards


def tied_pairs(model) -> list[tuple[str, str]]:
    """(module path, attribute) pairs that share a parameter with an earlier one, with that one."""
    seen: dict[int, str] = {}
    pairs = []
    for mname, m in model.named_modules(remove_duplicate=False):
        for k, p in m._parameters.items():
            if p is None:
                continue
            full = f"{mname}.{k}" if mname else k
            if id(p) in seen:
                pairs.append((full, seen[id(p)]))
            else:
                seen[id(p)] = full
    return pairs


def full_model_state_dict(model) -> dict:
    """Collective: the whole model's state dict on the main process's CPU (empty elsewhere),
    gathered one parameter at a time; a tied parameter (the head tied to the embeddings) once,
    under the name transformers keeps."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for dst, _src in tied_pairs(model):
        sd.pop(dst, None)
    return sd



def save_sharded(model, opt, directory: Path) -> None:
    """Collective: every rank writes its shard of the model and the optimizer into ``directory``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(directory))


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def load_sharded(model, opt, ck: Path) -> None:
    """Fill ``model`` and ``opt`` (sharded or not, at any world size) from ``ck/dcp``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    d = Path(ck) / DCP_DIR
    if not (d / ".metadata").is_file():
        raise CheckpointError(f"{d}/.metadata: missing (sharded model and optimizer state); the checkpoint is incomplete")
    from torch.distributed.checkpoint.api import CheckpointException

    msd, osd = get_state_dict(model, opt)
    try:
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(d), no_dist=not _distributed())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a reader error (truncated shard, bad metadata) of many kinds
        if isinstance(e, CheckpointException) and e.failures:  # a BaseException holding each rank's error
            e = next(iter(e.failures.values()))[0]
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise CheckpointError(
            f"{d}: cannot read the sharded model and optimizer state (truncated or corrupt?): {first}; "
            f"remove {Path(ck).name} to resume from the checkpoint before it"
        ) from None
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
