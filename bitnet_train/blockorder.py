"""What both data readers (the stream and the token shards) agree on about the order of training
blocks: the position a checkpoint records and the ranks' shares.

A position is ``taken`` (training blocks of all ranks handed out, the same on every rank) plus,
for token shards, the ``epoch``, and for the stream, ``lanes``: each lane's state
(:mod:`bitnet_train.stream`). Ranks hold the states of their own lanes; :func:`merge_positions`
joins them into the one position a checkpoint saves."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataPosition:
    epoch: int = 0
    taken: int = 0  # training blocks (of all ranks) handed out (in this epoch, for token shards)
    lanes: dict | None = None  # the stream's lane states, by lane number (a string, as in JSON)

    def to_dict(self) -> dict:
        if self.lanes is not None:
            return {"taken": self.taken, "lanes": self.lanes}
        return {"epoch": self.epoch, "taken": self.taken}

    @classmethod
    def from_dict(cls, d: dict) -> "DataPosition":
        lanes = d.get("lanes")
        return cls(int(d.get("epoch", 0)), int(d["taken"]), dict(lanes) if lanes is not None else None)


def merge_positions(positions: list[dict]) -> dict:
    """The position of all ranks together, from each rank's ``to_dict()``: the furthest (epoch,
    taken), with every rank's lane states."""
    best = max(positions, key=lambda d: (d.get("epoch", 0), d["taken"]))
    if best.get("lanes") is None:
        return best
    lanes: dict = {}
    for d in positions:
        lanes.update({k: v for k, v in (d.get("lanes") or {}).items() if v is not None or k not in lanes})
    return {"taken": best["taken"], "lanes": dict(sorted(lanes.items(), key=lambda kv: int(kv[0])))}


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
