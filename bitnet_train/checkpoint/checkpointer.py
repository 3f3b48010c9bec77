"""A run's checkpoints: which one a run continues from (discovery of ``step-N`` of pretraining and
``checkpoint-N`` of the TRL/Trainer stages, and the resume policy both share), and, for
pretraining, the :class:`TrainState` that is checkpointed and the :class:`Checkpointer` that
saves and restores it with the model, the optimizer and the random number generators.

A pretraining checkpoint ``OUTPUT_DIR/checkpoints/step-NNNNNN/`` is a model checkpoint
(:mod:`bitnet_train.checkpoint.format`) plus ``optimizer.pt``, ``rng.pt`` and ``trainer_state.json``
(the :class:`TrainState`, the world size and the recipe), written atomically.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bitnet_train.data.block_order import DataPosition, merge_positions
from bitnet_train.errors import CheckpointError, DiskFullError, RecipeError

# OUTPUT_DIR/checkpoints/step-NNNNNN (pretraining) and OUTPUT_DIR/checkpoints/checkpoint-N (sft, dpo)
PRETRAIN_CHECKPOINT = re.compile(r"^step-(\d{6,})$")
TRAINER_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"  # written last into a checkpoint: present means complete


def list_checkpoints(out: Path, pattern: re.Pattern = PRETRAIN_CHECKPOINT) -> list[tuple[int, Path]]:
    """(step, directory) of the complete checkpoints in ``out/checkpoints``, oldest first."""
    d = Path(out) / "checkpoints"
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = pattern.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resume_point(out: Path, resume: bool, stage: str, pattern: re.Pattern = PRETRAIN_CHECKPOINT,
                 announce: bool = True) -> tuple[int, Path] | None:
    """The checkpoint a run continues from: the newest with ``resume``, none without. An output
    directory that holds checkpoints while ``resume`` is off is an error (nothing is overwritten);
    ``resume`` with no checkpoint starts from scratch, with a note when ``announce``."""
    ckpts = list_checkpoints(out, pattern)
    if ckpts and not resume:
        raise RecipeError(
            f"output_dir {str(out)!r} already holds checkpoints; pass --resume to continue, or choose another output_dir"
        )
    if resume and not ckpts and announce:
        print(f"{stage}: no checkpoint in {out}/checkpoints; starting from scratch", file=sys.stderr)
    return ckpts[-1] if (resume and ckpts) else None


def intact(out: Path, pattern: re.Pattern = PRETRAIN_CHECKPOINT) -> str:
    """What a failed save leaves to resume from, and what to do (the words of the error)."""
    done = list_checkpoints(out, pattern)
    where = (f"The last complete checkpoint, {done[-1][1]}, is intact: --resume continues from it once there "
             "is room" if done else "No checkpoint of this run was completed")
    return (f"{where}; a lower train.keep_last keeps fewer checkpoints (older ones are removed only after a "
            "new one is complete), another output_dir puts them elsewhere")


@contextlib.contextmanager
def saving(ck_dir: Path, out: Path, needed: int, pattern: re.Pattern = PRETRAIN_CHECKPOINT, in_place: bool = False):
    """``with saving(ck_dir, out, needed):`` write checkpoint ``ck_dir`` of the run in ``out``. Refused
    before anything is written when its filesystem lacks room for ``needed`` bytes (0: not known); a
    write the filesystem fails (full, read-only) ends in an error that names the checkpoint still
    intact and what to do. ``in_place``: the writer does not write atomically (transformers' Trainer),
    so a failed write's directory is removed here."""
    from bitnet_train.errors import UserError
    from bitnet_train.fsutil import nbytes, need_space, write_failure

    if needed:
        try:
            need_space(ck_dir, needed, f"checkpoint {ck_dir.name}")
        except DiskFullError as e:
            raise DiskFullError(f"{e}. {intact(out, pattern)}") from None
    try:
        yield
    except BaseException as e:
        if isinstance(e, UserError):
            # an atomic writer's own report of the filesystem (full, read-only, denied: raised from the OSError),
            # or another error of the save (a model stock transformers cannot express), passed on as it is
            fs = isinstance(e, DiskFullError) or isinstance(e.__cause__, (OSError, RuntimeError))
            err = e if fs else None
        else:
            err = write_failure(e, ck_dir, nbytes(ck_dir))  # an in-place writer's OSError
        if err is None:
            raise
        if in_place:
            shutil.rmtree(ck_dir, ignore_errors=True)  # the partial checkpoint; earlier ones stay
        raise type(err)(f"{err}. {intact(out, pattern)}") from None


def drop_incomplete(out: Path, pattern: re.Pattern) -> list[Path]:
    """Remove the checkpoint directories of ``out/checkpoints`` that a killed save left incomplete
    (named like a checkpoint, without the state file that is written last). Call it holding the
    output directory's lock."""
    d = Path(out) / "checkpoints"
    gone = [p for p in d.iterdir() if pattern.match(p.name) and p.is_dir() and not (p / STATE_FILE).is_file()] \
        if d.is_dir() else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


# ----------------------------------------------------------------------------- pretraining state


@dataclass
class TrainState:
    """Where a pretraining run stands: what ``trainer_state.json`` holds (with the world size and
    the recipe). ``data_position`` is the object the data reader advances in place."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens trained on, all ranks together
    data_position: DataPosition = field(default_factory=DataPosition)
    skipped_steps: int = 0  # steps whose update a non-finite loss or gradient skipped

    @classmethod
    def read(cls, ck: Path) -> "TrainState":
        f = Path(ck) / STATE_FILE
        try:
            st = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{f}: cannot read the training state: {e}") from None
        m = PRETRAIN_CHECKPOINT.match(Path(ck).name)
        step = int(m.group(1)) if m else int(st["step"])
        return cls(step=step, tokens=int(st["tokens"]), data_position=DataPosition.from_dict(st["data_position"]),
                   skipped_steps=int(st.get("skipped_steps", 0)))


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume_recipe(ck: Path, recipe: dict, rules: dict[str, str]) -> list[str]:
    """Compare the recipe a checkpoint was saved with to ``recipe`` under ``rules`` (key path ->
    ``"refuse"`` or ``"warn"``, :func:`bitnet_train.recipe.resume_rules` of the recipe's schema): a
    changed refused key (the data, the seed, the model) raises a RecipeError naming each key with
    its old and new value; changed warned keys are returned as warning lines. A checkpoint that
    recorded no recipe passes."""
    try:
        saved = json.loads((Path(ck) / STATE_FILE).read_text()).get("recipe")
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{Path(ck) / STATE_FILE}: cannot read the training state: {e}") from None
    if not isinstance(saved, dict):
        return []
    old, new = _flat(saved), _flat(recipe)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]

    def under(k, roots):
        return any(k == r or k.startswith(r + ".") for r in roots)

    refuse = [k for k, v in rules.items() if v == "refuse"]
    warn = [k for k, v in rules.items() if v == "warn"]
    refused = [k for k in changed if under(k, refuse)]
    if refused:
        what = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in refused)
        raise RecipeError(f"--resume from {ck}: the recipe changed keys that decide the data or the model ({what}); "
                          "restore them, or start a new run in another output_dir")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed if under(k, warn)]


def rng_state() -> dict:
    import numpy as np
    import torch

    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import numpy as np
    import torch

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) state dict: about what saving it writes."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _by_name(model, opt, full: dict, f: Path) -> dict:
    """A whole checkpoint's ``optimizer.pt`` (``torch.optim`` numbers its parameters in the order of
    the parameter groups) keyed by parameter name, the form FSDP's ``set_optimizer_state_dict`` shards.
    ``opt`` was built with the same groups, in the same order, as the optimizer that saved it."""
    names = {id(p): n for n, p in model.named_parameters()}
    flat = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    n_saved = sum(len(g["params"]) for g in full["param_groups"])
    if n_saved != len(flat):
        raise CheckpointError(f"{f}: holds the state of {n_saved} parameters, the model has {len(flat)}")
    return {"state": {flat[int(i)]: v for i, v in full["state"].items()},
            "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [flat[int(i)] for i in g["params"]]}
                             for g in full["param_groups"]]}


class Checkpointer:
    """Saves and restores a pretraining run under ``out`` through an ``accelerate`` Accelerator:
    every rank calls :meth:`save` (the gathers are collective), the main process writes.

    A model sharded with FSDP2 (:mod:`bitnet_train.training.distributed`) is checkpointed sharded: each
    rank writes its shard of the model and the optimizer into ``dcp/`` (``torch.distributed.checkpoint``),
    the main process the config, tokenizer, RNG states and ``trainer_state.json``; ``final/`` is
    the model gathered parameter by parameter on the main process (never the optimizer)."""

    def __init__(self, out: Path, acc, tokenizer, recipe_dict: dict, keep_last: int, fsdp: bool = False):
        self.out, self.acc, self.tok, self.recipe_dict, self.keep_last = Path(out), acc, tokenizer, recipe_dict, keep_last
        self.fsdp = fsdp  # the model is sharded with FSDP2: checkpoints are sharded (dcp/)

    def prepare(self, model, opt, ck: Path | None):
        """``acc.prepare(model, opt)`` (a model sharded with FSDP2 is used as it is), restoring the
        model and optimizer of a sharded checkpoint ``ck`` (``dcp/``, at any world size), or the
        optimizer of a whole one, and the RNGs (each at the point it must be restored at)."""
        from bitnet_train.checkpoint.format import load_state_file
        from bitnet_train.checkpoint.sharded import DCP_DIR, load_sharded

        sharded_ck = ck is not None and (Path(ck) / DCP_DIR).is_dir()
        if sharded_ck:
            load_sharded(model, opt, ck)
        elif ck is not None and self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            f = ck / "optimizer.pt"
            full = _by_name(model, opt, load_state_file(f, "optimizer state"), f)
            set_optimizer_state_dict(model, opt, full, options=StateDictOptions(full_state_dict=True))
        elif ck is not None:
            opt.load_state_dict(load_state_file(ck / "optimizer.pt", "optimizer state"))
        if not self.fsdp:
            model, opt = self.acc.prepare(model, opt)
        if ck is not None:
            rng = load_state_file(ck / "rng.pt", "random number generator state")
            if "per_rank" in rng:
                rank = self.acc.process_index
                rng = rng["per_rank"][rank] if rank < len(rng["per_rank"]) else rng["per_rank"][0]
            set_rng_state(rng)
        return model, opt

    def save(self, model, opt, state: TrainState, final: bool = False) -> Path:
        """Write ``checkpoints/step-N`` and drop the checkpoints beyond ``keep_last``, or ``final/`` (the
        model and tokenizer only). Collective; the caller synchronises the ranks after."""
        if final:
            ck_dir = self.out / "final"
            self._save_final(model, ck_dir, state)
            return ck_dir
        ck_dir = self.out / "checkpoints" / f"step-{state.step:06d}"
        run_state = self._run_state(state)
        if self.fsdp:
            self._save_sharded(model, opt, ck_dir, run_state, state)
        else:
            self._save_whole(model, opt, ck_dir, run_state, state)
        if self.acc.is_main_process:
            for _, old in list_checkpoints(self.out)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        return ck_dir

    def _run_state(self, state: TrainState) -> dict:
        """Collective: what a step checkpoint holds besides the model and the optimizer — the content
        of ``trainer_state.json`` and the RNG states (every rank's)."""
        from accelerate.utils import gather_object

        world = self.acc.num_processes
        # ranks stop at different blocks of a round; the furthest position has consumed them all
        pos = state.data_position.to_dict()
        position = merge_positions(gather_object([pos]) if world > 1 else [pos])
        rng = {"per_rank": gather_object([rng_state()])} if world > 1 else rng_state()
        return {"rng": rng, "state": {"step": state.step, "tokens": state.tokens, "data_position": position,
                                      "world_size": world, "skipped_steps": state.skipped_steps,
                                      "recipe": self.recipe_dict}}

    @staticmethod
    def _write_run_state(tmp: Path, run_state: dict, opt_state=None) -> None:
        import torch

        if opt_state is not None:
            torch.save(opt_state, tmp / "optimizer.pt")
        torch.save(run_state["rng"], tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(run_state["state"], indent=2))  # last: present means complete

    def _save_whole(self, model, opt, ck_dir: Path, run_state: dict, state: TrainState) -> None:
        """One process's (or DDP's) checkpoint: the main process writes model, optimizer and state."""
        from bitnet_train.checkpoint.format import save_checkpoint

        if not self.acc.is_main_process:
            return
        unwrapped = self.acc.unwrap_model(model, keep_torch_compile=False)
        opt_state = opt.state_dict()
        with saving(ck_dir, self.out, tensor_bytes(unwrapped.state_dict()) + tensor_bytes(opt_state)):
            save_checkpoint(unwrapped, ck_dir, tokenizer=self.tok, extra={"stage": "pretrain", "step": state.step},
                            write_extra=lambda tmp: self._write_run_state(tmp, run_state, opt_state))

    def _save_final(self, model, ck_dir: Path, state: TrainState) -> None:
        """``final/``: the model only; under FSDP gathered one parameter at a time onto the main process's CPU."""
        from bitnet_train.checkpoint.format import save_checkpoint
        from bitnet_train.checkpoint.sharded import full_model_state_dict

        state_dict = full_model_state_dict(model) if self.fsdp else None  # collective
        if not self.acc.is_main_process:
            return
        unwrapped = self.acc.unwrap_model(model, keep_torch_compile=False)
        with saving(ck_dir, self.out, tensor_bytes(state_dict if state_dict is not None else unwrapped.state_dict())):
            save_checkpoint(unwrapped, ck_dir, tokenizer=self.tok, state_dict=state_dict,
                            extra={"stage": "pretrain", "step": state.step, "recipe": self.recipe_dict})

    def _save_sharded(self, model, opt, ck_dir: Path, run_state: dict, state: TrainState) -> None:
        """A sharded checkpoint, atomically: the main process opens the temporary directory and
        tells the others its name, every rank writes its shard into ``dcp/``, then the main
        process adds the config, tokenizer and state files and puts the directory in place. (Its
        size on one filesystem is not known to one rank: no space check before it.)"""
        import torch.distributed as dist

        from bitnet_train.checkpoint.format import save_checkpoint
        from bitnet_train.checkpoint.sharded import DCP_DIR, save_sharded

        if not self.acc.is_main_process:
            name = [None]
            dist.broadcast_object_list(name, src=0)
            save_sharded(model, opt, Path(name[0]) / DCP_DIR)
            return

        def write(tmp: Path):
            dist.broadcast_object_list([str(tmp)], src=0)
            save_sharded(model, opt, tmp / DCP_DIR)
            self._write_run_state(tmp, run_state)

        with saving(ck_dir, self.out, 0):
            save_checkpoint(model, ck_dir, tokenizer=self.tok, extra={"stage": "pretrain", "step": state.step},
                            write_extra=write, weights=False)
