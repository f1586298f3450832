"""Fused kernels equal the eager arithmetic and the field's reference steps, bit for bit."""

from __future__ import annotations

import pytest
import torch

from shieldtune.errors import EncodingError
from shieldtune.shielded.field import (
    add_mod,
    decode_rows,
    encode_rows,
    from_field,
    largest_prime_below,
    sub_mod,
    to_field,
)
from shieldtune.shielded.kernels import Kernels

P = largest_prime_below(2**40)


@pytest.fixture(scope="module")
def fused() -> Kernels:
    k = Kernels(fused=True)
    k._compile()
    if not k.fused:
        pytest.skip("torch.compile cannot build kernels on this machine")
    return k


def _operands(n: int, d: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.logspace(-30, 30, n)[:, None]
    x[0] = 0  # a row of zeros (scale 1)
    x[1, 0] = torch.finfo(torch.float32).max  # the largest magnitude
    x[2] = torch.finfo(torch.float32).tiny  # subnormal-scale row
    return [x, x.double(), -0.5 * x]


@pytest.mark.parametrize(("n", "d"), [(7, 5), (64, 96), (300, 33)])
def test_fused_encode_mask_equals_eager_and_the_field_steps(fused, n: int, d: int) -> None:
    eager = Kernels(fused=False)
    g = torch.Generator().manual_seed(n)
    for x in _operands(n, d, n):
        mask = torch.randint(0, P, (n, d), generator=g)
        pre = torch.rand(d, generator=g, dtype=torch.float64) * 3
        for bits in (1, 12, 23):
            for col in (None, pre):
                a, sa = fused.encode_mask(x, col, mask, bits, P)
                b, sb = eager.encode_mask(x, col, mask, bits, P)
                assert torch.equal(a, b) and torch.equal(sa, sb)
                ref = x.double() * col if col is not None else x
                x_int, s = encode_rows(ref, bits)  # the field's reference encoding
                assert torch.equal(a, add_mod(to_field(x_int, P), mask, P))
                assert torch.equal(sa, s)


def test_fused_unmask_decode_equals_eager_and_the_field_steps(fused) -> None:
    eager = Kernels(fused=False)
    g = torch.Generator().manual_seed(1)
    for n, m in [(5, 3), (128, 200)]:
        got, fac = (
            torch.randint(0, P, (n, m), generator=g),
            torch.randint(0, P, (n, m), generator=g),
        )
        got[0, 0], fac[0, 0] = 0, P - 1  # wraps
        rows = torch.rand(n, 1, generator=g, dtype=torch.float64)
        cols = torch.rand(m, generator=g, dtype=torch.float64)
        for col in (None, cols):
            a = fused.unmask_decode(got, fac, rows, col, P)
            assert torch.equal(a, eager.unmask_decode(got, fac, rows, col, P))
            ref = decode_rows(from_field(sub_mod(got, fac, P), P), rows, col)
            assert torch.equal(a, ref)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_operands_are_refused_fused_and_eager(fused, bad: float) -> None:
    x = torch.ones(4, 6)
    x[2, 3] = bad
    mask = torch.zeros(4, 6, dtype=torch.int64)
    for k in (fused, Kernels(fused=False)):
        with pytest.raises(EncodingError, match="1 non-finite"):
            k.encode_mask(x, None, mask, 8, P)
