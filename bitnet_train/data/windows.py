"""Packed scoring windows, shared by ``bitnet-train eval`` (:mod:`bitnet_train.evaluation.evaluate`) and the
pretraining loop's validation: the token stream ``EOS doc1 EOS doc2 EOS ...`` cut into windows of
``seq_len + 1`` tokens that overlap by one, so that every token after the leading EOS is predicted
once, each window from a fresh context; the last window may be shorter."""

from __future__ import annotations


class Packer:
    """Push tokens (EOS after each document included); take the full windows as they are ready
    (:meth:`windows`), and the last, shorter one at the end (:meth:`rest`)."""

    def __init__(self, eos: int, seq_len: int):
        self.seq_len, self.buf = seq_len, [eos]

    def push(self, tokens: list[int]) -> None:
        self.buf += tokens

    @property
    def queued(self) -> int:
        """Predictions pushed but not yet in a window."""
        return len(self.buf) - 1

    def windows(self) -> list[list[int]]:
        """The full windows now ready (``seq_len`` predictions each); a window is cut only once a
        token follows it, so the next one can start with its last token."""
        out, i, n = [], 0, self.seq_len
        while len(self.buf) - i > n + 1:
            out.append(self.buf[i : i + n + 1])
            i += n
        del self.buf[:i]
        return out

    def rest(self) -> list[list[int]]:
        """The last window (everything still queued), if any prediction is left."""
        return [self.buf] if len(self.buf) > 1 else []
