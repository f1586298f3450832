"""Optimiser and precision helpers shared by the recipes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

__all__ = ["Optim", "make_optim", "autocast"]


class Optim:
    """AdamW over a parameter list, with gradient clipping and a learning-rate schedule.

    Args:
        params: Trainable parameters (must be non-empty).
        lr: Peak learning rate.
        weight_decay: AdamW decoupled weight decay.
        grad_clip: Max global gradient norm, or None.
        total_steps: Steps the run will take (needed by the ``linear`` schedule).
        schedule: ``constant``, or ``linear`` (warm up over ``warmup_ratio`` of the steps,
            then decay linearly to 0).
        warmup_ratio: Share of the steps spent warming up.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float,
        weight_decay: float = 0.0,
        grad_clip: float | None = 1.0,
        *,
        total_steps: int | None = None,
        schedule: str = "constant",
        warmup_ratio: float = 0.0,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: no parameter requires a gradient")
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.grad_clip = grad_clip
        self.sched = None
        if schedule == "linear" and total_steps:
            warm = max(1, round(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0

            def factor(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                return max(0.0, (total_steps - step) / max(1, total_steps - warm))

            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)

    def step(self) -> None:
        """Clip, step, advance the schedule and clear gradients."""
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def num_params(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.params)


def make_optim(
    params: Iterable[nn.Parameter], lr: float, train: Any = None, total_steps: int | None = None
) -> Optim:
    """Build an :class:`Optim` from a ``TrainConfig``-like object (decay, clip, schedule).

    Args:
        params: Trainable parameters.
        lr: Peak learning rate (the front slice may use its own).
        train: A ``TrainConfig`` (``weight_decay``, ``grad_clip``, ``schedule``,
            ``warmup_ratio``); None for plain AdamW at a constant rate.
        total_steps: Steps the run will take (for the schedule).
    """
    if train is None:
        return Optim(params, lr)
    return Optim(
        params,
        lr,
        train.weight_decay,
        train.grad_clip,
        total_steps=total_steps,
        schedule=train.schedule,
        warmup_ratio=train.warmup_ratio,
    )


_OPTIM_KEYS = ("weight_decay", "grad_clip", "schedule", "warmup_ratio")


def optim_settings(train: Any) -> dict[str, float | str | None]:
    """What :func:`make_optim` reads of a ``TrainConfig``, as flat values.

    A host puts them into an enclave's measured config; the enclave reads them back with
    :func:`optim_from_settings`, through the same conversions.
    """
    return {
        "weight_decay": float(train.weight_decay),
        "grad_clip": None if train.grad_clip is None else float(train.grad_clip),
        "schedule": str(train.schedule),
        "warmup_ratio": float(train.warmup_ratio),
    }


def optim_from_settings(config: Mapping[str, Any]) -> SimpleNamespace:
    """:func:`make_optim`'s ``train`` argument from a config holding :func:`optim_settings`.

    Raises:
        KeyError: A setting is missing.
        TypeError, ValueError: A setting is of the wrong kind.
    """
    return SimpleNamespace(**optim_settings(SimpleNamespace(**{k: config[k] for k in _OPTIM_KEYS})))


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on the tensors' device when asked, else a no-op (float32)."""
    if precision == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
