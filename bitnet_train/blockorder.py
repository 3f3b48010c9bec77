"""What both data readers (the stream and the token shards) agree on about the order of training
blocks: the position (epoch, blocks taken) a checkpoint records, the ranks' shares, and which
blocks are held out for validation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataPosition:
    epoch: int = 0
    taken: int = 0  # training blocks (of all ranks) handed out in this epoch

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken}

    @classmethod
    def from_dict(cls, d: dict) -> "DataPosition":
        return cls(int(d["epoch"]), int(d["taken"]))


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")


def held_out_period(val_fraction: float) -> int:
    """Every ``period``-th block (index ``period - 1`` of each group) is held out; 0 = none."""
    return max(2, round(1.0 / val_fraction)) if val_fraction > 0 else 0
