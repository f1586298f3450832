"""Optimiser and precision helpers shared by the recipes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["Optim", "make_optim", "autocast"]


class Optim:
    """AdamW over a parameter list with optional gradient clipping.

    Args:
        params: Trainable parameters (must be non-empty).
        lr: Learning rate.
        weight_decay: AdamW decoupled weight decay.
        grad_clip: Max global gradient norm, or None.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        weight_decay: float,
        grad_clip: float | None,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: no parameter requires a gradient")
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.grad_clip = grad_clip

    def step(self) -> None:
        """Clip, step and clear gradients."""
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def num_params(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.params)


def make_optim(
    params: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
) -> Optim:
    """Build an :class:`Optim` (see there)."""
    return Optim(params, lr, weight_decay, grad_clip)


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on the tensors' device when asked, else a no-op (float32)."""
    if precision == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
