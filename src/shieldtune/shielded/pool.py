"""Unmasking factors made ahead of use: a bounded pool per stream, filled while the party idles.

A stream is one (layer, direction) pair. Its k-th use takes the mask counter
``c = (k, 0, layer, 0, direction)`` (``direction`` 0 = forward, 1 = backward), so every counter
is used once and in increasing order (:class:`~shieldtune.shielded.masks.MaskPRF` refuses
anything else). An entry is the mask and its factor, for ``rows`` rows:

    forward:   R_c (rows, in)  and  U_c = R_c · W_intᵀ  mod p   (rows, out)
    backward:  S_c (rows, out) and  V_c = S_c · W_int   mod p   (rows, in)

A use of ``n <= rows`` rows takes the first ``n`` rows of the next entry (rows of a uniform mask
are independent, and row t of U_c depends on row t of R_c only); the rest of the entry is
discarded, never reused. A use with no entry ready (a *miss*) makes one on the spot: correct,
but paid online; misses are counted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from shieldtune.errors import ConfigError

__all__ = ["FORWARD", "BACKWARD", "Factor", "PoolStats", "FactorPool"]

FORWARD, BACKWARD = 0, 1


@dataclass
class Factor:
    """One mask and its unmasking factor (both int64 in [0, p))."""

    counter: tuple[int, int, int, int, int]
    mask: torch.Tensor  # (rows, d_sent)
    factor: torch.Tensor  # (rows, d_returned)


@dataclass
class PoolStats:
    """What the pool did (for logs and benchmarks)."""

    hits: int = 0
    misses: int = 0
    made: int = 0
    seconds_offline: float = 0.0  # making entries in fill()
    seconds_online: float = 0.0  # making entries on a miss
    per_stream_used: dict[tuple[int, int], int] = field(default_factory=dict)


# make(layer, direction, counter, rows) -> Factor
MakeFactor = Callable[[int, int, tuple[int, int, int, int, int], int], Factor]


class FactorPool:
    """Per-stream queues of ready :class:`Factor` entries.

    Args:
        make: Builds the entry of a counter (draws the mask once and computes its factor).
        streams: The (layer, direction) pairs that may be used.
        rows: Rows per entry (the largest use it serves without splitting).
        size: Entries kept ready per stream (0: no pool, every use is a miss).
    """

    def __init__(
        self,
        make: MakeFactor,
        streams: Sequence[tuple[int, int]],
        rows: int,
        size: int,
    ) -> None:
        if size < 0 or rows < 1:
            raise ConfigError(f"shielded pool: size must be >= 0 and rows >= 1, got {size}, {rows}")
        self.make, self.rows, self.size = make, rows, size
        self.streams = list(streams)
        self.next_use = dict.fromkeys(self.streams, 0)  # the next counter of each stream
        self.ready: dict[tuple[int, int], deque[Factor]] = {s: deque() for s in self.streams}
        self.active = set(self.streams)  # streams worth filling (pruned after a full step)
        self.stats = PoolStats()

    def _make_next(self, stream: tuple[int, int]) -> Factor:
        layer, direction = stream
        counter = (self.next_use[stream], 0, layer, 0, direction)
        self.next_use[stream] += 1
        return self.make(layer, direction, counter, self.rows)

    def take(self, layer: int, direction: int, n: int) -> Factor:
        """The next entry of a stream, cut to ``n`` rows (made now on a miss).

        Raises:
            ConfigError: Unknown stream, or ``n`` larger than the pool's rows (split the use).
        """
        stream = (layer, direction)
        if stream not in self.ready:
            raise ConfigError(f"shielded pool: no stream for layer {layer} direction {direction}")
        if n > self.rows:
            raise ConfigError(f"shielded pool: a use of {n} rows exceeds the pool's {self.rows}")
        queue = self.ready[stream]
        if queue:
            entry = queue.popleft()
            self.stats.hits += 1
        else:
            start = time.perf_counter()
            entry = self._make_next(stream)
            self.stats.seconds_online += time.perf_counter() - start
            self.stats.misses += 1
        used = self.stats.per_stream_used
        used[stream] = used.get(stream, 0) + 1
        return Factor(entry.counter, entry.mask[:n], entry.factor[:n])

    def prune(self) -> None:
        """Stop filling streams that were never used (e.g. input grads nothing needs)."""
        used = self.stats.per_stream_used
        self.active = {s for s in self.streams if used.get(s, 0) > 0}
        for stream in self.streams:
            if stream not in self.active:
                self.ready[stream].clear()

    def fill(self) -> int:
        """Top every active stream up to ``size`` entries; return how many were made."""
        start, made = time.perf_counter(), 0
        for stream in self.streams:
            if stream not in self.active:
                continue
            queue = self.ready[stream]
            while len(queue) < self.size:
                queue.append(self._make_next(stream))
                made += 1
        self.stats.made += made
        self.stats.seconds_offline += time.perf_counter() - start
        return made

    def nbytes(self) -> int:
        """Bytes held by ready entries."""
        return sum(
            e.mask.numel() * e.mask.element_size() + e.factor.numel() * e.factor.element_size()
            for q in self.ready.values()
            for e in q
        )
