"""Exact modular GEMM backends: bit-for-bit against Python ints, refusals, probe and cache."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shieldtune.errors import ConfigError, EncodingError
from shieldtune.shielded import gemm as gemm_mod
from shieldtune.shielded.field import Field, QuantizedWeight, largest_prime_below, quantize_weight
from shieldtune.shielded.gemm import (
    GEMM_BACKENDS,
    ProbeResult,
    probe,
    probe_cached,
    resolve_backend,
)

BACKENDS = GEMM_BACKENDS.names()
M61 = 2**61 - 1
P62 = 2**62 - 57


def _ref(a: torch.Tensor, m: torch.Tensor, p: int) -> list[list[int]]:
    """(a @ m) mod p with Python ints."""
    cols = list(zip(*m.tolist(), strict=True))
    return [[sum(x * y for x, y in zip(r, c, strict=True)) % p for c in cols] for r in a.tolist()]


def _qw(w_int: torch.Tensor, w_bits: int) -> QuantizedWeight:
    a = w_int.abs()
    return QuantizedWeight(
        w_int=w_int,
        scale=torch.ones(w_int.shape[0], dtype=torch.float64),
        w_bits=w_bits,
        row_l1=int(a.sum(1).max()),
        col_l1=int(a.sum(0).max()),
    )


def _check_exact(name: str, p: int, qw: QuantizedWeight, x: torch.Tensor, g: torch.Tensor):
    be = GEMM_BACKENDS.get(name)
    field = Field(p)
    reason = be.supports(field, qw, "cpu")
    if reason is not None:
        return reason
    pw = be.prepare(qw, field, "cpu")
    y, gx = be.forward(pw, x), be.backward(pw, g)
    assert y.dtype == gx.dtype == torch.int64
    assert y.tolist() == _ref(x, qw.w_int.t(), p), pw.describe()
    assert gx.tolist() == _ref(g, qw.w_int, p), pw.describe()
    return None


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("p", [251, 65521, largest_prime_below(2**38), M61, P62])
@pytest.mark.parametrize("w_bits", [4, 8, 12, 16])
def test_random_operands_bit_for_bit(name, p, w_bits):
    gen = torch.Generator().manual_seed(p % 9973 + w_bits)
    qw = quantize_weight(torch.randn(9, 14, generator=gen), w_bits)
    x = torch.randint(0, p, (5, 14), generator=gen)
    g = torch.randint(0, p, (5, 9), generator=gen)
    assert _check_exact(name, p, qw, x, g) is None


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("p", [251, largest_prime_below(2**33), largest_prime_below(2**53), P62])
@pytest.mark.parametrize("w_bits", [8, 16])
@pytest.mark.parametrize("signs", ["plus", "minus", "mixed"])
def test_worst_case_operands_bit_for_bit(name, p, w_bits, signs):
    """All operands p - 1, all weights ±(2**(w_bits-1) - 1): every partial sum at its bound."""
    q = 2 ** (w_bits - 1) - 1
    gen = torch.Generator().manual_seed(w_bits)
    sign = {
        "plus": torch.ones(6, 40, dtype=torch.int64),
        "minus": -torch.ones(6, 40, dtype=torch.int64),
        "mixed": torch.where(torch.rand(6, 40, generator=gen) < 0.5, -1, 1),
    }[signs]
    qw = _qw(sign * q, w_bits)
    x = torch.full((3, 40), p - 1)
    g = torch.full((3, 6), p - 1)
    x[1] = 0
    g[2] = (p - 1) // 2
    assert _check_exact(name, p, qw, x, g) is None


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("cols", [514, 515])
def test_int32_and_float_bounds_reached_exactly(name, cols):
    """row_l1 = cols * 127: int8 limb terms hit -128 * l1; a merged pair of terms is just under
    2**31 for 514 columns and just over it for 515 (so it must not be merged in int32)."""
    p = largest_prime_below(2**45)
    qw = _qw(torch.full((2, cols), 127), 8)
    assert (128 * qw.row_l1 * 257 <= 2**31 - 1) == (cols == 514)
    x = torch.tensor([0, p - 1, (p - 1) & ~0xFFFF, 0x80 * 0x0101010101]).repeat_interleave(cols)
    x = x.view(4, cols)
    g = torch.full((4, 2), p - 1)
    assert _check_exact(name, p, qw, x, g) is None or name == "fp32"


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(BACKENDS),
    k=st.integers(3, 62),
    w_bits=st.integers(2, 16),
    n=st.integers(0, 5),
    d_in=st.integers(1, 11),
    d_out=st.integers(1, 11),
    seed=st.integers(0, 2**16),
    extreme=st.booleans(),
)
def test_property_exact_for_any_shape_field_and_width(
    name, k, w_bits, n, d_in, d_out, seed, extreme
):
    p = largest_prime_below(2**k)
    gen = torch.Generator().manual_seed(seed)
    qw = quantize_weight(torch.randn(d_out, d_in, generator=gen), w_bits)
    x = torch.randint(0, p, (n, d_in), generator=gen)
    g = torch.randint(0, p, (n, d_out), generator=gen)
    if extreme:
        x = torch.where(x % 2 == 0, p - 1, 0)
        g = torch.where(g % 2 == 0, p - 1, 0)
    reason = _check_exact(name, p, qw, x, g)
    # fp64 (limbs) and int8 cover every field and width at these sizes
    assert reason is None or name == "fp32", reason


def test_supports_refuses_out_of_bound_combinations_with_a_reason():
    field = Field(M61)
    wide = _qw(torch.full((2, 1100), 2**15 - 1), 16)  # row_l1 ~ 2**25 >= 2**24
    reason = GEMM_BACKENDS.get("fp32").supports(field, wide, "cpu")
    assert reason is not None and "row_l1" in reason and "fp32" in reason
    with pytest.raises(EncodingError, match="row_l1"):
        GEMM_BACKENDS.get("fp32").prepare(wide, field, "cpu")
    assert GEMM_BACKENDS.get("fp64").supports(field, wide, "cpu") is None  # limbs make it exact
    huge = _qw(torch.full((1, 140_000), 127), 8)  # 128 * 127 * 140000 >= 2**31
    reason = GEMM_BACKENDS.get("int8").supports(field, huge, "cpu")
    assert reason is not None and "int32" in reason
    for name in BACKENDS:
        assert "not supported" in GEMM_BACKENDS.get(name).supports(field, wide, "meta")


def test_fp64_uses_one_gemm_when_the_bound_allows_and_limbs_otherwise():
    be = GEMM_BACKENDS.get("fp64")
    qw = _qw(torch.full((4, 100), 127), 8)  # l1 = 12700 (fwd), 508 (bwd)
    small = be.prepare(qw, Field(largest_prime_below(2**39)), "cpu")
    assert small.fwd.plan.limbs == 1 and small.bwd.plan.limbs == 1
    big = be.prepare(qw, Field(M61), "cpu")
    assert big.fwd.plan.limbs > 1
    assert "fp64" in big.describe()


def test_fp32_refused_under_reduced_precision():
    be = GEMM_BACKENDS.get("fp32")
    field = Field(65521)
    qw = _qw(torch.ones(3, 4, dtype=torch.int64), 8)
    pw = be.prepare(qw, field, "cpu")
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert "precision" in be.supports(field, qw, "cpu")
        with pytest.raises(EncodingError, match="no longer exact"):
            be.forward(pw, torch.zeros(2, 4, dtype=torch.int64))
    finally:
        torch.set_float32_matmul_precision(old)
    assert be.supports(field, qw, "cpu") is None


@pytest.mark.parametrize("name", BACKENDS)
def test_bad_inputs_refused(name):
    be = GEMM_BACKENDS.get(name)
    field = Field(65521)
    qw = _qw(torch.ones(3, 4, dtype=torch.int64), 8)
    pw = be.prepare(qw, field, "cpu")
    with pytest.raises(EncodingError):
        be.forward(pw, torch.zeros(2, 5, dtype=torch.int64))  # wrong width
    with pytest.raises(EncodingError):
        be.forward(pw, torch.zeros(2, 4, dtype=torch.int32))  # wrong dtype
    with pytest.raises(EncodingError):
        be.backward(pw, torch.zeros(2, 4, dtype=torch.int64))  # backward wants (n, out)
    other = next(n for n in BACKENDS if n != name)
    with pytest.raises(EncodingError, match="prepared by"):
        GEMM_BACKENDS.get(other).forward(pw, torch.zeros(2, 4, dtype=torch.int64))
    assert be.forward(pw, torch.zeros(0, 4, dtype=torch.int64)).shape == (0, 3)


@pytest.mark.parametrize("w_bits", [8, 16])
def test_int8_padding_path_is_exact(monkeypatch, w_bits):
    """The CUDA shape padding (rows > 16, K and N multiples of 8), exercised on the CPU."""
    monkeypatch.setattr(gemm_mod, "_int_mm_pads", lambda device: True)
    p = largest_prime_below(2**45)
    gen = torch.Generator().manual_seed(w_bits)
    qw = quantize_weight(torch.randn(9, 13, generator=gen), w_bits)
    be = GEMM_BACKENDS.get("int8")
    pw = be.prepare(qw, Field(p), "cpu")
    assert pw.fwd.mat.shape[0] % 8 == 0 and pw.fwd.mat.shape[1] % 8 == 0
    assert pw.fwd.min_rows == 17
    for n in (1, 3, 20):
        x = torch.randint(0, p, (n, 13), generator=gen)
        g = torch.randint(0, p, (n, 9), generator=gen)
        assert be.forward(pw, x).tolist() == _ref(x, qw.w_int.t(), p)
        assert be.backward(pw, g).tolist() == _ref(g, qw.w_int, p)


# ----------------------------------------------------------------------------- probe


def _weights() -> list[QuantizedWeight]:
    gen = torch.Generator().manual_seed(0)
    return [
        quantize_weight(torch.randn(24, 16, generator=gen) * 0.05, 8),
        quantize_weight(torch.randn(16, 24, generator=gen) * 0.05, 8),
    ]


def test_probe_returns_a_supported_timed_choice():
    field = Field(largest_prime_below(2**36))
    res = probe(field, _weights(), rows=32, device="cpu", repeats=1)
    assert res.choice in res.timings_ms and res.choice in GEMM_BACKENDS
    assert set(res.timings_ms) | set(res.unsupported) == set(BACKENDS)
    assert res.timings_ms[res.choice] == min(res.timings_ms.values())
    assert res.device == "cpu" and "torch" in res.machine


def test_probe_lists_unsupported_and_lying_backends(monkeypatch):
    field = Field(largest_prime_below(2**36))
    fp64 = GEMM_BACKENDS.get("fp64")
    honest = fp64.forward

    def lying(pw, x):
        y = honest(pw, x)
        y[0, 0] = (y[0, 0] + 1) % pw.p
        return y

    monkeypatch.setattr(fp64, "forward", lying)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        res = probe(field, _weights(), rows=20, device="cpu", repeats=1)
    finally:
        torch.set_float32_matmul_precision(old)
    assert "Freivalds" in res.unsupported["fp64"]
    assert "precision" in res.unsupported["fp32"]
    assert res.choice == "int8"
    with pytest.raises(EncodingError, match="no exact GEMM backend"):
        probe(field, _weights(), rows=20, device="cpu", candidates=["fp64"], repeats=1)
    with pytest.raises(ConfigError, match="accepted"):
        probe(field, _weights(), rows=20, device="cpu", candidates=["nope"])


def test_probe_cached_reuses_and_repairs_the_cache(tmp_path, monkeypatch):
    field = Field(largest_prime_below(2**36))
    calls = []
    real_probe = gemm_mod.probe

    def counting(*args, **kwargs):
        calls.append(1)
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(gemm_mod, "probe", counting)
    kw = dict(rows=16, device="cpu", candidates=["fp64", "int8"], repeats=1, cache_dir=tmp_path)
    first = probe_cached(field, _weights(), **kw)
    assert not first.from_cache and len(calls) == 1
    files = list(tmp_path.glob("gemm_probe_*.json"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    second = probe_cached(field, _weights(), **kw)
    assert second.from_cache and len(calls) == 1
    assert (second.choice, second.timings_ms) == (first.choice, first.timings_ms)
    # another field is another key
    probe_cached(Field(largest_prime_below(2**30)), _weights(), **kw)
    assert len(calls) == 2 and len(list(tmp_path.glob("gemm_probe_*.json"))) == 2
    # corrupted files are ignored and rewritten, never a crash
    for garbage in ("{not json", json.dumps({"key": 1}), "[]", "", json.dumps({"k": None})):
        files[0].write_text(garbage)
        res = probe_cached(field, _weights(), **kw)
        assert not res.from_cache
        assert json.loads(files[0].read_text())["result"]["choice"] == res.choice
    n = len(calls)
    data = json.loads(files[0].read_text())
    data["result"]["choice"] = "quantum"  # well-formed JSON naming an unknown backend
    files[0].write_text(json.dumps(data))
    assert not probe_cached(field, _weights(), **kw).from_cache and len(calls) == n + 1
    assert probe_cached(field, _weights(), **kw).from_cache


def test_probe_result_json_round_trip():
    res = ProbeResult("int8", {"int8": 1.5, "fp64": 2.0}, {"fp32": "why"}, "cpu", "m")
    assert ProbeResult.from_json(json.loads(json.dumps(res.to_json()))) == res
    with pytest.raises(ValueError):
        ProbeResult.from_json({**res.to_json(), "choice": "fp32"})  # not a timed backend


def test_resolve_backend():
    res = ProbeResult("int8", {"int8": 1.0}, {}, "cpu", "m")
    assert resolve_backend(None, res).name == "int8"
    assert resolve_backend("auto", res).name == "int8"
    assert resolve_backend("fp64", res).name == "fp64"  # the override wins
    assert resolve_backend("fp32", None).name == "fp32"
    with pytest.raises(ConfigError, match="auto, fp32, fp64, int8"):
        resolve_backend("fp16", res)
    with pytest.raises(ConfigError, match="probe"):
        resolve_backend("auto", None)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 5, 7), (40, 24, 16), (17, 9, 33)])
def test_cuda_matches_cpu_bit_for_bit(name, shape):
    n, d_in, d_out = shape
    p = largest_prime_below(2**40)
    field = Field(p)
    gen = torch.Generator().manual_seed(0)
    qw = quantize_weight(torch.randn(d_out, d_in, generator=gen), 8)
    x = torch.randint(0, p, (n, d_in), generator=gen)
    g = torch.randint(0, p, (n, d_out), generator=gen)
    be = GEMM_BACKENDS.get(name)
    if be.supports(field, qw, "cuda") is not None:
        pytest.skip(be.supports(field, qw, "cuda"))
    pw = be.prepare(qw, field, "cuda")
    assert be.forward(pw, x.cuda()).cpu().tolist() == _ref(x, qw.w_int.t(), p)
    assert be.backward(pw, g.cuda()).cpu().tolist() == _ref(g, qw.w_int, p)
