"""Where a run's checkpoints are and which one a run continues from: discovery (``step-N`` of
pretraining, ``checkpoint-N`` of the TRL/Trainer stages) and the resume policy both share."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .errors import RecipeError

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
