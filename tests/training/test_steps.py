"""Optimiser schedule: linear warm-up then decay to zero; constant stays constant."""

from __future__ import annotations

import pytest
import torch

from shieldtune.training.loop import planned_steps
from shieldtune.training.steps import Optim


def _lrs(optim: Optim, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        optim.params[0].grad = torch.ones(3)
        out.append(optim.opt.param_groups[0]["lr"])
        optim.step()
    return out


def test_linear_schedule_warms_up_then_decays_to_zero():
    p = [torch.nn.Parameter(torch.zeros(3))]
    lrs = _lrs(Optim(p, 1.0, total_steps=10, schedule="linear", warmup_ratio=0.2), 10)
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] == pytest.approx(0.125)


def test_constant_schedule_and_empty_params():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert set(_lrs(Optim(p, 0.1, total_steps=5, schedule="constant"), 5)) == {0.1}
    with pytest.raises(ValueError, match="nothing to train"):
        Optim([torch.nn.Parameter(torch.zeros(1), requires_grad=False)], 0.1)


def test_planned_steps():
    assert planned_steps(10, 3, 4, None) == 9
    assert planned_steps(10, 3, 4, 5) == 5
