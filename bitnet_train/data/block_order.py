"""What both data readers (the stream and the token shards) agree on about the order of training
blocks: the position a checkpoint records and the ranks' shares.

A position is ``taken`` (training blocks of all ranks handed out, the same on every rank) plus,
for token shards, the ``epoch``, and for the stream, ``lanes``: each lane's state
(:mod:`bitnet_train.data.stream`). Ranks hold the states of their own lanes; :func:`merge_positions`
joins them into the one position a checkpoint saves. The token shards' per-epoch order is a
:class:`BlockPermutation`."""

from __future__ import annotations

import hashlib
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



_M64 = (1 << 64) - 1
_FEISTEL_ROUNDS = 6


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a bijective 64-bit mixing function."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _M64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _M64
    return x ^ (x >> 31)


class BlockPermutation:
    """A seeded pseudo-random permutation of ``range(n)``, computed per index in O(1) memory.

    A balanced Feistel network over ``2 * h`` bits (the smallest even width with
    ``2 ** (2 * h) >= n``; round keys from ``(seed, epoch)``, round function :func:`_mix64`) is a
    bijection of ``[0, 4 ** h)``; cycle walking (apply it again until the value is below ``n``)
    restricts it to a bijection of ``[0, n)``. The domain is less than ``4 * n``, so an index takes
    fewer than 4 walks on average. The same ``(n, seed, epoch)`` always gives the same order."""

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 0:
            raise ValueError(f"n {n} is negative")
        self.n = n
        bits = max(2, (max(n - 1, 1)).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        digest = hashlib.blake2b(f"bitnet-train block order {int(seed)} {int(epoch)}".encode(),
                                 digest_size=8 * _FEISTEL_ROUNDS).digest()
        self.keys = [int.from_bytes(digest[8 * i : 8 * i + 8], "little") for i in range(_FEISTEL_ROUNDS)]

    def __len__(self) -> int:
        return self.n

    def _feistel(self, x: int) -> int:
        h, m = self.half, self.mask
        left, right = x >> h, x & m
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & m)
        return (left << h) | right

    def __getitem__(self, k: int) -> int:
        k = int(k)
        if k < 0:
            k += self.n
        if not 0 <= k < self.n:
            raise IndexError(f"permutation index {k} out of range for {self.n} blocks")
        x = self._feistel(k)
        while x >= self.n:
            x = self._feistel(x)
        return x

    def __iter__(self):
        return (self[k] for k in range(self.n))
