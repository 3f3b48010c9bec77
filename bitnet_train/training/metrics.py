"""What a run reports: ``metrics.jsonl`` (one JSON line per step or evaluation, cut back to the
checkpoint on resume), the optional Weights & Biases mirror, and the ``loss.png`` curve."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bitnet_train.errors import RecipeError


@dataclass
class WandbConfig:
    """A recipe's ``wandb:`` section (pretrain, sft, dpo)."""

    enabled: bool = field(default=False, metadata={
        "help": "log metrics to Weights & Biases (sft/dpo: through TRL's report_to)"})
    project: str = field(default="bitnet-train", metadata={"help": "wandb project"})
    name: str | None = field(default=None, metadata={"help": "run name (default: wandb's)"})
    mode: str | None = field(
        default=None,
        metadata={"choices": ("online", "offline", "disabled"),
                  "help": "default: $WANDB_MODE, else online with credentials, offline without"},
    )


def plot_loss(metrics_path: Path, png_path: Path) -> Path | None:
    """Write the loss curve (training loss per step, validation loss per evaluation) as a PNG,
    atomically. Returns None (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("pretrain: matplotlib not installed, no loss-curve PNG (pip install matplotlib)", file=sys.stderr)
        return None
    from bitnet_train.fsutil import atomic_path

    recs = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    train = [(r["step"], r["loss"]) for r in recs if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(png_path)


def wandb_mode(cfg) -> str:
    if cfg.mode:
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    netrc = Path.home() / ".netrc"
    if not has_key and netrc.is_file():
        has_key = "api.wandb.ai" in netrc.read_text(errors="ignore")
    return "online" if has_key else "offline"


class WandbLogger:
    """wandb when the recipe enables it (offline without credentials), else nothing."""

    def __init__(self, cfg, out: Path, recipe_dict: dict, resume_step: int | None):
        self.run = None
        if not cfg.enabled:
            return
        try:
            import wandb
        except ImportError:
            raise RecipeError("wandb.enabled is true but wandb is not installed (pip install wandb)") from None
        self.run = wandb.init(
            project=cfg.project, name=cfg.name, config=recipe_dict, dir=str(out), mode=wandb_mode(cfg),
            resume="allow" if resume_step is not None else None,
        )

    def log(self, rec: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MetricsLog:
    """``metrics.jsonl``, written a line at a time (flushed); a resumed run first drops the lines
    after the step it resumes from. ``sink`` (the wandb logger) gets every record too."""

    def __init__(self, path: Path, keep_upto: int | None, sink=None):
        self.path = path
        self.sink = sink
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_upto is None:
            path.write_text("")
        elif path.exists():
            # drop lines written after the checkpoint we resume from
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= keep_upto]
            path.write_text("".join(k + "\n" for k in kept))
        self.f = open(path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.sink is not None:
            self.sink.log(rec)

    def close(self):
        self.f.close()
