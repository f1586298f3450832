"""Split fine-tuning (Method 2): the per-batch step, split into what each party runs."""

from shieldtune.split.step import client_backward, client_forward, server_step

__all__ = ["client_forward", "server_step", "client_backward"]
