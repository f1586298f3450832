"""One-time masks: uniform over F_p, deterministic, full rank, never reused."""

from __future__ import annotations

import pytest
import torch

from shieldtune.errors import MaskReuseError
from shieldtune.shielded.field import Field
from shieldtune.shielded.masks import MaskPRF, uniform_from_bytes

KEY = bytes(range(32))
M61 = 2**61 - 1


def _prf(p: int, key: bytes = KEY) -> MaskPRF:
    return MaskPRF(key, Field(p))


def _rank_mod_p(rows: list[list[int]], p: int) -> int:
    """Rank over F_p by Gaussian elimination with Python ints."""
    m = [[v % p for v in r] for r in rows]
    rank, cols = 0, len(m[0]) if m else 0
    for c in range(cols):
        piv = next((i for i in range(rank, len(m)) if m[i][c]), None)
        if piv is None:
            continue
        m[rank], m[piv] = m[piv], m[rank]
        inv = pow(m[rank][c], -1, p)
        m[rank] = [v * inv % p for v in m[rank]]
        for i in range(len(m)):
            if i != rank and m[i][c]:
                f = m[i][c]
                m[i] = [(a - f * b) % p for a, b in zip(m[i], m[rank], strict=True)]
        rank += 1
    return rank


def _chi2(values: torch.Tensor, p: int) -> float:
    counts = torch.bincount(values, minlength=p).double()
    expected = values.numel() / p
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("p", [13, 17, 257])
def test_masks_are_uniform_on_the_whole_field(p):
    """Chi-square against uniform. p = 17 uses 5-bit draws: `mod p` would double 0..14."""
    m = _prf(p).mask((0, 0, 0, 0, 0), (40 * p * 10,))
    assert m.dtype == torch.int64
    assert int(m.min()) == 0 and int(m.max()) == p - 1
    # dof = p - 1; mean p - 1, sd sqrt(2(p - 1)); 6 sd is a loose, non-flaky bound
    dof = p - 1
    assert _chi2(m, p) < dof + 6 * (2 * dof) ** 0.5


def test_biased_sampler_would_be_caught():
    """The bucket test above has power: `draw mod 17` of 5-bit draws fails it."""
    g = torch.Generator().manual_seed(0)
    biased = torch.randint(0, 32, (6800,), generator=g) % 17
    assert _chi2(biased, 17) > 16 + 6 * 32**0.5


def test_large_field_masks_spread_over_the_range():
    m = _prf(M61).mask((1, 2, 3, 4, 5), (20_000,))
    assert int(m.min()) >= 0 and int(m.max()) < M61
    top = (m >> 57).bincount(minlength=16)  # top 4 of 61 bits: 16 equal buckets
    assert int(top.min()) > 20_000 / 16 * 0.8
    assert abs(float(m.double().mean()) / M61 - 0.5) < 0.02


def test_uniform_from_bytes_rejects_and_refills_in_order():
    """Rejected draws are refilled from the same stream; the result depends only on it."""
    stream = bytes([0xFF, 0, 0, 0, 3, 0, 0, 0, 0x0E, 0, 0, 0, 7, 0, 0, 0] * 4)
    pos = 0

    def read(k: int) -> bytes:
        nonlocal pos
        out = stream[pos : pos + k]
        pos += k
        return out

    # p = 13: 4-bit draws 15, 3, 14, 7, 15, 3, ... -> 15 and 14 rejected
    v = uniform_from_bytes(read, 13, 3)
    assert v.tolist() == [7, 3, 3]  # pos 0 <- 7 (first accepted refill), 1 = 3, 2 <- 3
    assert uniform_from_bytes(read, 13, 0).numel() == 0


def test_deterministic_per_key_counter_and_shape():
    a, b = _prf(M61), _prf(M61)
    c = (3, 1, 7, 0, 1)
    ma = a.mask(c, (4, 6))
    assert torch.equal(ma, b.mask(c, (4, 6)))
    assert torch.equal(ma, a.peek(c, (4, 6)))
    assert not torch.equal(ma, _prf(M61, key=bytes(32)).mask(c, (4, 6)))  # other key
    assert not torch.equal(ma.flatten(), a.peek(c, (6, 4)).flatten())  # shape is bound in


@pytest.mark.parametrize("field_idx", range(5))
def test_every_counter_field_changes_the_mask(field_idx):
    prf = _prf(M61)
    base = [5, 5, 5, 5, 5]
    other = list(base)
    other[field_idx] += 1
    m0 = prf.peek(tuple(base), (8, 8))
    m1 = prf.peek(tuple(other), (8, 8))
    assert int((m0 == m1).sum()) == 0  # independent streams: no coincident entries


def test_reuse_and_non_increasing_counters_raise():
    prf = _prf(257)
    prf.mask((0, 0, 1, 0, 0), (2, 3))
    with pytest.raises(MaskReuseError, match="already used"):
        prf.mask((0, 0, 1, 0, 0), (2, 3))
    with pytest.raises(MaskReuseError, match="already used"):
        prf.mask((0, 0, 1, 0, 0), (5,))  # another shape does not make it fresh
    prf.mask((0, 3, 1, 0, 0), (2, 3))
    with pytest.raises(MaskReuseError, match="not after"):
        prf.mask((0, 2, 1, 0, 0), (2, 3))
    prf.mask((1, 0, 1, 0, 0), (2, 3))  # next step, micro-batch restarts
    with pytest.raises(MaskReuseError, match=r"'step': 0.*'micro_batch': 9"):
        prf.mask((0, 9, 1, 0, 0), (2, 3))
    # streams (layer, op, direction) are independent of each other
    prf.mask((0, 0, 2, 0, 0), (2, 3))
    prf.mask((0, 0, 1, 1, 0), (2, 3))
    prf.mask((0, 0, 1, 0, 1), (2, 3))
    assert prf.used == 6


def test_peek_does_not_consume_and_used_counts():
    prf = _prf(13)
    prf.peek((0, 0, 0, 0, 0), (3,))
    prf.peek((0, 0, 0, 0, 0), (3,))
    assert prf.used == 0
    prf.mask((0, 0, 0, 0, 0), (3,))
    assert prf.used == 1


def test_bad_key_counter_and_shape_refused():
    for key in (b"short", bytes(33), "x" * 32):
        with pytest.raises(ValueError):
            MaskPRF(key, Field(13))  # type: ignore[arg-type]
    prf = _prf(13)
    for c in ((0, 0, 0, 0), (0, 0, 0, 0, -1), (0, 0, 0, 0, 2**32), (0, 0, 0.5, 0, 0)):
        with pytest.raises(ValueError):
            prf.mask(c, (2,))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        prf.mask((0, 0, 0, 0, 0), (2, -1))
    assert prf.used == 0
    assert "0001020304" not in repr(prf) and KEY.hex() not in repr(prf)


@pytest.mark.parametrize(("p", "shape"), [(13, (8, 64)), (M61, (16, 24)), (257, (24, 24))])
def test_masks_have_full_rank(p, shape):
    m = _prf(p).mask((0, 0, 0, 0, 0), shape)
    assert _rank_mod_p(m.tolist(), p) == min(shape)


def test_rows_never_equal():
    m = _prf(257).mask((0, 0, 0, 0, 0), (256, 6))
    assert len({tuple(r) for r in m.tolist()}) == 256


def test_device_argument():
    m = _prf(13).mask((0, 0, 0, 0, 0), (2, 2), device="cpu")
    assert m.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mask_on_cuda_equals_cpu():
    prf = _prf(M61)
    assert torch.equal(
        prf.mask((0, 0, 0, 0, 0), (5, 7), device="cuda").cpu(), prf.peek((0, 0, 0, 0, 0), (5, 7))
    )
