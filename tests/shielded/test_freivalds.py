"""Freivalds checks of returned products, and the exact modular mat-vec behind them."""

from __future__ import annotations

import random
import secrets

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shieldtune.shielded.field import Field, QuantizedWeight, largest_prime_below, quantize_weight
from shieldtune.shielded.freivalds import FreivaldsCheck, horner_mod, modmatmul, modmatvec

M61 = 2**61 - 1
P62 = 2**62 - 57


def _ref(a: torch.Tensor, m: torch.Tensor, p: int) -> list[list[int]]:
    cols = list(zip(*m.tolist(), strict=True))
    return [[sum(x * y for x, y in zip(r, c, strict=True)) % p for c in cols] for r in a.tolist()]


def _setup(p: int, seed: int = 0, out: int = 7, inp: int = 10, n: int = 5):
    gen = torch.Generator().manual_seed(seed)
    qw = quantize_weight(torch.randn(out, inp, generator=gen), 8)
    x = torch.randint(0, p, (n, inp), generator=gen)
    g = torch.randint(0, p, (n, out), generator=gen)
    y = torch.tensor(_ref(x, qw.w_int.t(), p))
    gx = torch.tensor(_ref(g, qw.w_int, p))
    return qw, x, g, y, gx


# ----------------------------------------------------------------------------- modmatmul


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(2, 62),
    n=st.integers(0, 4),
    depth=st.integers(1, 40),
    m=st.integers(1, 3),
    worst=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_modmatmul_is_exact(k, n, depth, m, worst, seed):
    p = largest_prime_below(2**k) if k > 2 else 3
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(0, p, (n, depth), generator=gen)
    v = torch.randint(0, p, (depth, m), generator=gen)
    if worst:
        a.fill_(p - 1)
        v.fill_(p - 1)
    assert modmatmul(a, v, p).tolist() == _ref(a, v, p)


@pytest.mark.parametrize(
    ("p", "k"),
    [(M61, 50_000), (P62, 50_000), (largest_prime_below(2**38), 1536), (2**51 - 129, 3)],
)
def test_modmatvec_exact_on_long_rows_of_maximal_entries(p, k):
    """Rows of p - 1: every limb split (one-sided and two-sided) must stay exact at its bound."""
    gen = torch.Generator().manual_seed(k)
    a = torch.full((4, k), p - 1)
    a[1, ::3] = 1
    a[2:] = torch.randint(p - 2**20, p, (2, k), generator=gen)  # odd low bits: no lucky zeros
    v = torch.full((k,), p - 1)
    v[k // 2] = 12345
    v[1::2] = torch.randint(p - 2**20, p, (k // 2,), generator=gen)
    vl = v.tolist()
    expect = [sum(x * y for x, y in zip(row, vl, strict=True)) % p for row in a.tolist()]
    assert modmatvec(a, v, p).tolist() == expect


def test_horner_mod_against_python():
    gen = torch.Generator().manual_seed(3)
    for p, shift, bound in ((M61, 8, 2**21), (P62, 31, 2**53), (1_000_003, 40, 2**61)):
        terms = [torch.randint(-bound, bound + 1, (64,), generator=gen) for _ in range(5)]
        corr = torch.randint(0, p, (64,), generator=gen)
        got = horner_mod(terms, shift, bound, p, corr).tolist()
        exp = [
            (sum(int(t[i]) << (shift * j) for j, t in enumerate(terms)) + int(corr[i])) % p
            for i in range(64)
        ]
        assert got == exp


# ----------------------------------------------------------------------------- checks


@pytest.mark.parametrize("p", [65521, largest_prime_below(2**38), M61, P62])
def test_correct_products_pass(p):
    qw, x, g, y, gx = _setup(p)
    chk = FreivaldsCheck(qw, Field(p))
    assert chk.check_forward(x, y)
    assert chk.check_backward(g, gx)
    assert not chk.check_forward(x, torch.zeros_like(y) if bool(y.any()) else y + 1)


@pytest.mark.parametrize("p", [largest_prime_below(2**38), M61])
@pytest.mark.parametrize("delta", [1, -1])
def test_every_single_flipped_entry_is_detected(p, delta):
    qw, x, g, y, gx = _setup(p, seed=1)
    chk = FreivaldsCheck(qw, Field(p))
    for prod, a, check in ((y, x, chk.check_forward), (gx, g, chk.check_backward)):
        for i in range(prod.shape[0]):
            for j in range(prod.shape[1]):
                bad = prod.clone()
                bad[i, j] = (bad[i, j] + delta) % p
                assert not check(a, bad), (i, j)


def test_small_field_soundness_grows_with_repetitions():
    """p = 13: one vector misses a wrong row w.p. 1/13; 8 repetitions detect every flip."""
    p = 13
    qw = QuantizedWeight(
        w_int=torch.tensor([[1, -2, 3], [0, 1, -1]]),
        scale=torch.ones(2, dtype=torch.float64),
        w_bits=4,
        row_l1=6,
        col_l1=3,
    )
    x = torch.randint(0, p, (30, 3), generator=torch.Generator().manual_seed(0))
    y = torch.tensor(_ref(x, qw.w_int.t(), p))
    chk = FreivaldsCheck(qw, Field(p), generator=random.Random(5), repetitions=8)
    assert chk.check_forward(x, y)
    for i in range(30):
        bad = y.clone()
        bad[i, 1] = (bad[i, 1] + 1 + i % 12) % p
        assert not chk.check_forward(x, bad)


def test_malformed_returned_products_fail_without_raising():
    p = M61
    qw, x, g, y, gx = _setup(p, seed=2)
    chk = FreivaldsCheck(qw, Field(p), repetitions=2)
    # y + p is congruent mod p but out of range: the consumer would mis-decode it
    shifted = y.clone()
    shifted[0, 0] += p
    negative = y.clone()
    negative[1, 1] -= p
    for bad in (
        shifted,
        negative,
        y[:, :-1],  # wrong width
        y[:-1],  # wrong rows
        y.double(),  # wrong dtype
        y.flatten(),  # wrong rank
        None,
    ):
        assert chk.check_forward(x, bad) is False  # type: ignore[arg-type]
    for bad in (gx[:, 1:], gx.to(torch.int32), gx + p):
        assert chk.check_backward(g, bad) is False


def test_malformed_trusted_operand_raises():
    p = 65521
    qw, x, g, y, gx = _setup(p)
    chk = FreivaldsCheck(qw, Field(p))
    with pytest.raises(ValueError):
        chk.check_forward(x[:, :-1], y)
    with pytest.raises(ValueError):
        chk.check_backward(g.double(), gx)


def test_randomness_sources():
    p = 65521
    qw, x, g, y, gx = _setup(p)
    for src in (None, secrets, secrets.SystemRandom(), lambda k: bytes(k), random.Random(1)):
        chk = FreivaldsCheck(qw, Field(p), generator=src)
        assert chk.check_forward(x, y) and chk.check_backward(g, gx)
    with pytest.raises(TypeError, match="cryptographic"):
        FreivaldsCheck(qw, Field(p), generator=torch.Generator())
    with pytest.raises(ValueError):
        FreivaldsCheck(qw, Field(p), repetitions=0)
    chk = FreivaldsCheck(qw, Field(p))
    assert repr(chk) == "FreivaldsCheck(p=65521, out=7, in=10, repetitions=1)"  # no secrets


def test_empty_batch_passes():
    p = 65521
    qw, x, g, y, gx = _setup(p)
    chk = FreivaldsCheck(qw, Field(p))
    assert chk.check_forward(x[:0], y[:0])
    assert chk.check_backward(g[:0], gx[:0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_operands():
    p = M61
    qw, x, g, y, gx = _setup(p)
    chk = FreivaldsCheck(qw, Field(p))
    assert chk.check_forward(x.cuda(), y.cuda())
    bad = y.clone()
    bad[0, 0] = (bad[0, 0] + 1) % p
    assert not chk.check_forward(x.cuda(), bad.cuda())
