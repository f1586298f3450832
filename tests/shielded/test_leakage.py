"""What the accelerator sees: uniform, independent of the secrets, useless to a known plaintext.

The operands are read back from the worker's own capture (what it really received), not from
the enclave's side.
"""

from __future__ import annotations

from pathlib import Path

import torch
from _shielded import make_party
from safetensors.torch import load_file

from shieldtune.shielded.field import encode_rows, from_field, sub_mod, to_field


def _captured(folder: Path) -> list[torch.Tensor]:
    return [load_file(str(f))["sent"] for f in sorted(folder.glob("*.safetensors"))]


def _seen_for(worker, tmp_path: Path, name: str, x: torch.Tensor, seed: int) -> tuple:  # noqa: ANN001
    """Operand the accelerator received for ``x`` on map 0, and the party that sent it."""
    accel = worker(capture=tmp_path / name, capture_limit=1)
    party = make_party(seed=seed)
    party.attach(accel.socket_path, "cpu", "auto")
    party.engine.forward(0, x)
    (seen,) = _captured(tmp_path / name)
    return seen, party


def _uniformity(values: torch.Tensor, p: int, bins: int = 16) -> float:
    """Pearson chi-square statistic of ``values`` against uniform over [0, p) in ``bins`` bins."""
    counts = torch.bincount((values.double() * bins / p).long().flatten(), minlength=bins).double()
    expected = values.numel() / bins
    return float(((counts - expected) ** 2 / expected).sum())


def test_the_operand_is_uniform_and_uncorrelated_with_the_secret(worker, tmp_path: Path) -> None:
    x = torch.randn(64, 64) * 3 + 1  # a secret with structure (mean, scale)
    seen, party = _seen_for(worker, tmp_path, "a", x, seed=0)
    p = party.field.p
    assert seen.shape == x.shape and int(seen.min()) >= 0 and int(seen.max()) < p
    # chi-square with 15 degrees of freedom: 99.9 % quantile is 37.7
    assert _uniformity(seen, p) < 37.7
    x_int, _ = encode_rows(x.double(), party.plans[0].fwd_bits)
    corr = torch.corrcoef(torch.stack([seen.double().flatten(), x_int.double().flatten()]))[0, 1]
    assert abs(float(corr)) < 0.1  # n = 4096: |corr| of independent data is ~0.02
    # the plaintext itself would be wildly non-uniform (negative control for the statistic)
    assert _uniformity(to_field(x_int, p), p) > 1000


def test_two_different_secrets_look_the_same(worker, tmp_path: Path) -> None:
    a, party = _seen_for(worker, tmp_path, "a", torch.randn(64, 64), seed=0)
    b, _ = _seen_for(worker, tmp_path, "b", torch.randn(64, 64) * 50 - 7, seed=1)
    p = party.field.p
    # two-sample comparison of the binned distributions: indistinguishable
    bins = 16
    ca = torch.bincount((a.double() * bins / p).long().flatten(), minlength=bins).double()
    cb = torch.bincount((b.double() * bins / p).long().flatten(), minlength=bins).double()
    chi2 = float(((ca - cb) ** 2 / (ca + cb)).sum())
    assert chi2 < 37.7


def _known_plaintext_attack(seen: torch.Tensor, known_row: torch.Tensor, row: int, p: int):
    """arXiv 2602.11088's idea at its simplest: learn the mask where the plaintext is known
    (a BOS / padding position) and strip it from every other position."""
    mask_guess = sub_mod(seen[row : row + 1], known_row, p)  # (1, d)
    return from_field(sub_mod(seen, mask_guess.expand_as(seen), p), p)  # (n, d) recovered


def test_known_plaintext_positions_reveal_nothing_about_the_others(worker, tmp_path) -> None:
    x = torch.randn(64, 64)
    x[0] = 0.5  # a position whose plaintext the attacker knows (e.g. a BOS embedding)
    seen, party = _seen_for(worker, tmp_path, "a", x, seed=0)
    p = party.field.p
    x_int, _ = encode_rows(x.double(), party.plans[0].fwd_bits)
    recovered = _known_plaintext_attack(seen, to_field(x_int[0:1], p), 0, p)
    assert torch.equal(recovered[0], x_int[0])  # the known row, trivially
    exact = (recovered[1:] == x_int[1:]).double().mean()
    assert float(exact) < 1e-3  # nothing else recovered
    # positive control: the same attack against a broken scheme (one mask row broadcast to all
    # rows, which DESIGN.md forbids) recovers every row exactly
    gen = torch.Generator().manual_seed(0)
    broadcast = torch.randint(0, p, (1, 64), generator=gen).expand(64, 64)
    broken = (to_field(x_int, p) + broadcast) % p
    assert torch.equal(_known_plaintext_attack(broken, to_field(x_int[0:1], p), 0, p), x_int)
