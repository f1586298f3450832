"""Field arithmetic and exact fixed-point encodings (Method 1)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shieldtune.errors import EncodingError
from shieldtune.shielded.field import (
    Field,
    QuantizedWeight,
    add_mod,
    check_field_range,
    check_range,
    decode_rows,
    encode_rows,
    from_field,
    input_bits,
    is_prime,
    largest_prime_below,
    quantize_weight,
    sub_mod,
    to_field,
)

M61 = 2**61 - 1
P62 = 2**62 - 57  # the largest prime below 2**62


def _brute_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _matmul_py(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    """Exact integer product with Python ints."""
    bt = list(zip(*b, strict=True))
    return [[sum(x * y for x, y in zip(row, col, strict=True)) for col in bt] for row in a]


# ----------------------------------------------------------------------------- primes


def test_is_prime_matches_brute_force_below_3000():
    assert [n for n in range(3000) if is_prime(n)] == [n for n in range(3000) if _brute_prime(n)]


@pytest.mark.parametrize("n", [2**31 - 1, M61, P62, 2**64 - 59, 1_000_000_007])
def test_known_primes(n):
    assert is_prime(n)


@pytest.mark.parametrize(
    "n",
    [
        561,  # Carmichael
        2047,  # strong pseudoprime to base 2
        3_215_031_751,  # strong pseudoprime to bases 2, 3, 5, 7
        3_825_123_056_546_413_051,  # strong pseudoprime to the first 9 prime bases
        (2**31 - 1) * (2**31 - 1),
        M61 * 3,
        2**62,
        2**64 - 1,
    ],
)
def test_known_composites(n):
    assert not is_prime(n)


def test_largest_prime_below():
    for n in range(3, 400):
        assert largest_prime_below(n) == max(q for q in range(n) if _brute_prime(q))
    assert largest_prime_below(2**61) == M61
    assert largest_prime_below(2**62) == P62
    with pytest.raises(ValueError):
        largest_prime_below(2)


def test_field_validates_modulus():
    f = Field(M61)
    assert f.bits == 61 and f.half == (M61 - 1) // 2
    for bad in (2, 15, 2**62 + 135, 0, -7):
        with pytest.raises(EncodingError):
            Field(bad)
    with pytest.raises(EncodingError):
        Field(2**89 - 1)  # prime, but too large
    with pytest.raises(EncodingError):
        Field(13.0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- mod ops


@pytest.mark.parametrize("p", [13, 2**31 - 1, M61, P62])
def test_add_sub_mod_match_python(p):
    g = torch.Generator().manual_seed(p % 1000)
    a = torch.randint(0, p, (500,), generator=g)
    b = torch.randint(0, p, (500,), generator=g)
    edges = torch.tensor([0, 0, p - 1, p - 1, 1, p - 1])
    edges_b = torch.tensor([0, p - 1, p - 1, 0, p - 1, 1])
    a, b = torch.cat([a, edges]), torch.cat([b, edges_b])
    s, d = add_mod(a, b, p), sub_mod(a, b, p)
    assert s.tolist() == [(x + y) % p for x, y in zip(a.tolist(), b.tolist(), strict=True)]
    assert d.tolist() == [(x - y) % p for x, y in zip(a.tolist(), b.tolist(), strict=True)]
    assert s.dtype == d.dtype == torch.int64


@pytest.mark.parametrize("p", [13, 257, M61, P62])
def test_to_from_field_round_trip_on_the_centered_range(p):
    h = (p - 1) // 2
    z = torch.tensor([0, 1, -1, h, -h, h - 1, -(h - 1), 5, -5])
    r = to_field(z, p)
    assert int(r.min()) >= 0 and int(r.max()) < p
    assert torch.equal(from_field(r, p), z)
    # every residue lifts into [-h, h]
    all_r = torch.arange(p) if p < 1000 else torch.tensor([0, 1, h, h + 1, p - 1])
    c = from_field(all_r, p)
    assert int(c.min()) >= -h and int(c.max()) <= h
    assert torch.equal(to_field(c, p), all_r)
    # outside the centered range the lift is (correctly) not the original integer
    assert int(from_field(to_field(torch.tensor([h + 1]), p), p)) != h + 1


def test_check_field_range():
    check_field_range(torch.tensor([0, 12]), 13)
    for bad in (torch.tensor([13]), torch.tensor([-1]), torch.tensor([1.0])):
        with pytest.raises(EncodingError):
            check_field_range(bad, 13)


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("w_bits", [2, 4, 8, 12, 16])
def test_quantize_weight_round_trip_and_bounds(w_bits):
    g = torch.Generator().manual_seed(w_bits)
    w = torch.randn(20, 33, generator=g) * 0.05
    w[3] = 0.0  # an all-zero row
    qw = quantize_weight(w, w_bits)
    qmax = 2 ** (w_bits - 1) - 1
    assert qw.w_int.dtype == torch.int64 and qw.scale.dtype == torch.float64
    assert int(qw.w_int.abs().max()) == qmax  # the range is used
    assert float(qw.scale[3]) == 1.0 and int(qw.w_int[3].abs().sum()) == 0
    err = (w.double() - qw.scale[:, None] * qw.w_int).abs()
    assert bool((err <= qw.scale[:, None] / 2 * (1 + 1e-9)).all())
    absw = qw.w_int.abs()
    assert qw.row_l1 == int(absw.sum(1).max()) and qw.col_l1 == int(absw.sum(0).max())
    assert (qw.out_features, qw.in_features) == (20, 33)


def test_quantize_weight_refuses_bad_input():
    w = torch.randn(4, 4)
    for bits in (1, 17, 8.0):
        with pytest.raises(EncodingError):
            quantize_weight(w, bits)  # type: ignore[arg-type]
    w[1, 2] = float("nan")
    w[0, 0] = float("inf")
    with pytest.raises(EncodingError, match="2 non-finite"):
        quantize_weight(w, 8)
    with pytest.raises(EncodingError):
        quantize_weight(torch.randn(4), 8)


# ----------------------------------------------------------------------------- encodings


@pytest.mark.parametrize("p", [M61, 1_000_003, 2**38 - 45])
@pytest.mark.parametrize("l1", [0, 1, 127, 50_000])
def test_input_bits_is_the_largest_exact_width(p, l1):
    f = Field(p)
    b = input_bits(f, l1)
    e = max(l1, 1)
    assert b >= 1
    assert (2**b - 1) * e <= f.half < (2 ** (b + 1) - 1) * e


def test_input_bits_refuses_a_too_small_field():
    with pytest.raises(EncodingError, match=r"p=13.*l1=7"):
        input_bits(Field(13), 7)
    assert input_bits(Field(13), 6) == 1
    with pytest.raises(ValueError):
        input_bits(Field(13), -1)


@pytest.mark.parametrize("bits", [1, 7, 20, 52, 62])
def test_encode_rows_bounds_and_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(9, 17, generator=g, dtype=torch.float64)
    x[2] = 0.0
    x[4] *= 1e-250  # tiny, but the scale stays a normal float64
    x[5] *= 1e300
    x_int, s = encode_rows(x, bits)
    qmax = 2**bits - 1
    assert x_int.dtype == torch.int64 and s.shape == (9, 1) and s.dtype == torch.float64
    assert int(x_int.abs().max()) <= qmax
    assert float(s[2]) == 1.0 and int(x_int[2].abs().sum()) == 0
    nz = [i for i in range(9) if i != 2]
    assert bool((x_int[nz].abs().amax(1) >= qmax - 1).all())  # every row uses its range
    rowmax = x.abs().amax(1, keepdim=True)
    err = (x - decode_rows(x_int, s, None)).abs()
    assert bool((err <= s / 2 + 4 * torch.finfo(torch.float64).eps * rowmax).all())


def test_encode_rows_float32_and_refusals():
    x = torch.tensor([[0.5, -0.25, 1.0]], dtype=torch.float32)
    x_int, s = encode_rows(x, 3)
    assert x_int.tolist() == [[4, -2, 7]] and float(s) == pytest.approx(1 / 7)
    bad = torch.randn(4, 5)
    bad[0, 0], bad[1, 1], bad[3, 4] = float("nan"), float("inf"), -float("inf")
    with pytest.raises(EncodingError, match="3 non-finite"):
        encode_rows(bad, 8)
    for bits in (0, 63):
        with pytest.raises(EncodingError):
            encode_rows(x, bits)
    with pytest.raises(EncodingError):
        encode_rows(torch.ones(2, 2, dtype=torch.int64), 4)


def test_decode_rows():
    y = torch.tensor([[1, -2], [3, 4]])
    out = decode_rows(
        y, torch.tensor([[2.0], [0.5]], dtype=torch.float64), torch.tensor([1.0, 10.0])
    )
    assert out.dtype == torch.float64
    assert out.tolist() == [[2.0, -40.0], [1.5, 20.0]]


def test_check_range():
    check_range(torch.tensor([7, -7, 0]), 3)
    with pytest.raises(EncodingError, match="2 entries"):
        check_range(torch.tensor([8, -7, -9]), 3)


# ----------------------------------------------------------------------------- exactness


def _masked_product(x_int: torch.Tensor, w: torch.Tensor, p: int, seed: int) -> torch.Tensor:
    """Method 1 over F_p, with Python-int GEMMs: dec((enc(x) + R) W - R W)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, p, x_int.shape, generator=g)
    xt = add_mod(to_field(x_int, p), r, p)  # what the accelerator sees
    wl = w.tolist()
    y = torch.tensor([[v % p for v in row] for row in _matmul_py(xt.tolist(), wl)])  # x̃ W
    u = torch.tensor([[v % p for v in row] for row in _matmul_py(r.tolist(), wl)])  # R W
    return from_field(sub_mod(y, u, p), p)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(20, 61),
    w_bits=st.integers(2, 16),
    n=st.integers(1, 4),
    d_in=st.integers(1, 12),
    d_out=st.integers(1, 12),
    worst=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_centered_result_is_the_exact_integer_product(k, w_bits, n, d_in, d_out, worst, seed):
    """Forward and backward: the bound of input_bits makes the masked result exact."""
    p = largest_prime_below(2**k)
    f = Field(p)
    g = torch.Generator().manual_seed(seed)
    qw = quantize_weight(torch.randn(d_out, d_in, generator=g), w_bits)
    try:
        b_fwd, b_bwd = input_bits(f, qw.row_l1), input_bits(f, qw.col_l1)
    except EncodingError:
        assert f.half < max(qw.row_l1, qw.col_l1)
        return
    for l1, bits, w in ((qw.row_l1, b_fwd, qw.w_int.t()), (qw.col_l1, b_bwd, qw.w_int)):
        q = 2**bits - 1
        if worst:  # every row aligned with the signs of the column of largest L1
            col = int(w.abs().sum(0).argmax())
            sign = torch.where(w[:, col] < 0, -1, 1)
            x_int = (sign * q).expand(n, -1).clone()
        else:
            x_int = torch.randint(-q, q + 1, (n, w.shape[0]), generator=g)
        check_range(x_int, bits)
        exact = _matmul_py(x_int.tolist(), w.tolist())
        if worst:
            assert max(abs(v) for row in exact for v in row) == q * l1  # bound reached
        assert _masked_product(x_int, w, p, seed).tolist() == exact


def test_one_bit_too_many_breaks_exactness():
    """The bound is tight: at bits + 1 the worst case wraps (hence the refusal upstream)."""
    p = largest_prime_below(2**24)
    qw = QuantizedWeight(
        w_int=torch.tensor([[127, -127, 127, 127]]),
        scale=torch.ones(1, dtype=torch.float64),
        w_bits=8,
        row_l1=508,
        col_l1=127,
    )
    bits = input_bits(Field(p), qw.row_l1)
    w = qw.w_int.t()
    for b, ok in ((bits, True), (bits + 1, False)):
        x_int = torch.tensor([[1, -1, 1, 1]]) * (2**b - 1)
        exact = _matmul_py(x_int.tolist(), w.tolist())
        assert (_masked_product(x_int, w, p, 0).tolist() == exact) is ok
