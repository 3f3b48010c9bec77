"""The checkpoints of the TRL stages (``sft``, ``dpo``): transformers' Trainer writes
``OUTPUT_DIR/checkpoints/checkpoint-N`` (``trainer_state.json`` last, so present means complete); this
module makes them checkpoints in our format (our ``quantization_config`` and metadata in
``config.json``), guards their writing like pretraining's (:func:`~bitnet_train.checkpoint.checkpointer.saving`)
and finds the one a stage continues from."""

from __future__ import annotations

import json
from pathlib import Path

from bitnet_train.checkpoint.checkpointer import (STATE_FILE, TRAINER_CHECKPOINT, drop_incomplete, list_checkpoints,
                                                  resume_point, saving, tensor_bytes)


def _patch_checkpoint_config(model, ck_dir: Path) -> None:
    """Trainer checkpoints hold the weights written by save_pretrained; put our quantization_config
    and metadata (:func:`~bitnet_train.checkpoint.format.checkpoint_metadata`) into their config.json so
    that they load (here and in stock transformers) as ternary models."""
    from bitnet_train.checkpoint.format import checkpoint_metadata

    f = ck_dir / "config.json"
    if not f.is_file():
        return
    cfg = json.loads(f.read_text())
    qc, meta = checkpoint_metadata(model)
    if qc:
        cfg["quantization_config"] = qc
    cfg["bitnet_train"] = meta
    f.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def with_our_checkpoint_format(base):
    class _Trainer(base):
        def _save(self, output_dir=None, state_dict=None):
            super()._save(output_dir, state_dict)
            _patch_checkpoint_config(self.model, Path(output_dir or self.args.output_dir))

        def _save_checkpoint(self, model, trial):
            """The Trainer's checkpoint (written in place, ``trainer_state.json`` last), through
            :func:`saving`: a full disk refused before writing where the size is known (the model and
            optimizer state), a write the filesystem fails leaving no partial ``checkpoint-N``."""
            if not self.args.should_save:  # this rank writes nothing
                return super()._save_checkpoint(model, trial)
            run_dir = Path(self._get_output_dir(trial=trial))
            ck = run_dir / f"checkpoint-{self.state.global_step}"
            opt = None if self.args.save_only_model or self.optimizer is None else self.optimizer.state_dict()
            with saving(ck, run_dir.parent, tensor_bytes(self.model.state_dict()) + tensor_bytes(opt),
                        TRAINER_CHECKPOINT, in_place=True):
                super()._save_checkpoint(model, trial)

    _Trainer.__name__ = base.__name__
    return _Trainer


def latest_trainer_checkpoint(out: Path) -> Path | None:
    """The newest complete Trainer checkpoint (``checkpoints/checkpoint-N``) in ``out``, or None."""
    found = list_checkpoints(out, TRAINER_CHECKPOINT)
    return found[-1][1] if found else None


def trainer_resume_point(out: Path, resume: bool, stage: str):
    drop_incomplete(out, TRAINER_CHECKPOINT)  # what a killed save left (the state file is written last)
    last = resume_point(out, resume, stage, TRAINER_CHECKPOINT)
    if last is None:
        return None, None
    return last[1], json.loads((last[1] / STATE_FILE).read_text())["global_step"]
