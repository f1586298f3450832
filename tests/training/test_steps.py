"""Optimiser schedules (warm-up, decay, constant) and its settings carried into an enclave."""

from __future__ import annotations

import pytest
import torch

from shieldtune.config import TrainConfig
from shieldtune.training.loop import planned_steps
from shieldtune.training.steps import Optim, optim_from_settings, optim_settings


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


def test_optim_settings_round_trip_through_an_enclave_config():
    train = TrainConfig(weight_decay=0.1, grad_clip=1.0, schedule="linear", warmup_ratio=0.1)
    config = {"lr": 1e-3, **optim_settings(train)}  # as a host writes it (JSON values)
    back = optim_from_settings(config)
    assert vars(back) == optim_settings(train)
    assert optim_settings(train.model_copy(update={"grad_clip": None}))["grad_clip"] is None


@pytest.mark.parametrize(
    "change", [{"weight_decay": None}, {"warmup_ratio": "x"}, {"schedule": ...}]
)
def test_optim_from_settings_refuses_a_missing_or_wrong_setting(change):
    config = optim_settings(TrainConfig())
    for key, value in change.items():
        if value is ...:
            del config[key]
        else:
            config[key] = value
    with pytest.raises((KeyError, TypeError, ValueError)):
        optim_from_settings(config)
