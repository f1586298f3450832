"""The DP option: clipping bound, noise scale, integer tensors untouched, refusals."""

from __future__ import annotations

import math

import pytest
import torch

from shieldtune.attacks import dp_noise, privatize
from shieldtune.errors import ConfigError


def _norm(state: dict[str, torch.Tensor]) -> float:
    return math.sqrt(
        sum(float(t.double().pow(2).sum()) for t in state.values() if t.is_floating_point())
    )


def _delta() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(50, 40, generator=gen) * 3,
        "b": torch.randn(30, generator=gen),
        "idx": torch.arange(7),
    }


def test_sigma_zero_only_clips_to_the_bound() -> None:
    delta = _delta()
    assert _norm(delta) > 10
    clipped = dp_noise(delta, clip=2.0, sigma=0.0, generator=torch.Generator())
    assert _norm(clipped) == pytest.approx(2.0, rel=1e-6)
    # direction kept, integer tensors passed through
    torch.testing.assert_close(clipped["a"] / clipped["b"].norm(), delta["a"] / delta["b"].norm())
    assert torch.equal(clipped["idx"], delta["idx"])
    small = {"a": torch.full((3,), 0.1)}
    assert torch.equal(dp_noise(small, 2.0, 0.0, torch.Generator())["a"], small["a"])


def test_noise_has_standard_deviation_sigma_times_clip() -> None:
    delta = {"a": torch.zeros(200_000)}
    noisy = dp_noise(delta, clip=0.5, sigma=3.0, generator=torch.Generator().manual_seed(1))
    assert float(noisy["a"].std()) == pytest.approx(1.5, rel=0.01)
    assert abs(float(noisy["a"].mean())) < 0.02
    again = dp_noise(delta, 0.5, 3.0, torch.Generator().manual_seed(1))
    assert torch.equal(again["a"], noisy["a"])  # reproducible from the generator


def test_privatize_noises_the_delta_not_the_state() -> None:
    start = {"a": torch.full((4,), 100.0), "idx": torch.arange(3)}
    update = {"a": torch.full((4,), 100.5), "idx": torch.arange(3) + 1}
    out = privatize(update, start, clip=10.0, sigma=0.0, generator=torch.Generator())
    torch.testing.assert_close(out["a"], update["a"])  # delta norm 1 < clip: unchanged
    assert torch.equal(out["idx"], update["idx"])


@pytest.mark.parametrize("clip, sigma", [(0.0, 1.0), (-1.0, 1.0), (1.0, -0.1), (math.inf, 1.0)])
def test_bad_settings_are_refused(clip: float, sigma: float) -> None:
    with pytest.raises(ConfigError, match="dp (clip|sigma)"):
        dp_noise(_delta(), clip, sigma, torch.Generator())
