"""Per-party random streams: each side of a split draws its dropout from its own generator.

In one process (plain-split) the client and server sides would otherwise share torch's global
generator; in two processes (split) they cannot. Giving each side its own stream makes the
two modes draw identical dropout masks, so they agree step for step.

A stream borrows torch's process-wide generator while it is active, so several clients training
in threads of one process (a simulated federation) take :data:`GLOBAL_RNG_LOCK` for that time;
code that seeds the global generator while others may train holds it too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["RngStream", "CLIENT_STREAM", "SERVER_STREAM", "GLOBAL_RNG_LOCK"]

#: Held while a stream (or other seeding code) owns torch's global generator.
GLOBAL_RNG_LOCK = threading.RLock()

CLIENT_STREAM = 0  # stream offsets added to the run seed
SERVER_STREAM = 1


class RngStream:
    """A CPU random stream that can be swapped in for torch's global generator.

    Args:
        seed: Seed of the stream.
    """

    def __init__(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.state = gen.get_state()

    @contextmanager
    def active(self) -> Iterator[None]:
        """Run a block with this stream as the global generator, then restore the global one."""
        with GLOBAL_RNG_LOCK:
            saved = torch.get_rng_state()
            torch.set_rng_state(self.state)
            try:
                yield
            finally:
                self.state = torch.get_rng_state()
                torch.set_rng_state(saved)
