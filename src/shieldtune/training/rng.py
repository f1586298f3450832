"""Per-party random streams: each side of a split draws its dropout from its own generator.

In one process (plain-split) the client and server sides would otherwise share torch's global
generator; in two processes (split) they cannot. Giving each side its own stream makes the
two modes draw identical dropout masks, so they agree step for step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["RngStream", "CLIENT_STREAM", "SERVER_STREAM"]

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
        saved = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(saved)
