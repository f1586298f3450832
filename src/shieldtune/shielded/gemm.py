"""Exact modular GEMMs of masked field elements by a frozen integer weight, chosen by measurement.

Every backend computes, bit for bit::

    forward   (x @ w_intᵀ) mod p    x: int64 (n, in)  in [0, p)   ->  int64 (n, out) in [0, p)
    backward  (g @ w_int)  mod p    g: int64 (n, out) in [0, p)   ->  int64 (n, in)  in [0, p)

The masked operand is uniform on ``[0, p)``; callers must pass values in that range (it is not
re-checked on the hot path; :func:`~shieldtune.shielded.field.check_field_range` does it). The
weight ``w_int`` is signed with ``|w| <= 2**(w_bits-1) - 1``. Both directions are the same
problem ``a (n, K) @ M (K, N)`` with ``M = w_intᵀ`` (bound ``l1 = row_l1``) or ``M = w_int``
(bound ``l1 = col_l1``): every partial sum of ``sum_j d_j M[j, i]`` is bounded by
``max|d| * l1``, whatever order a kernel accumulates in.

Exactness by construction (each backend's :meth:`ExactGemm.supports` checks it):

Which operand bound is right: the masked operand is uniform on ``[0, p)``, so used as is its
partial sums reach ``(p-1) * l1``. Shifting it by the public offset ``(p-1)//2`` (the same range
as centering, but one subtraction instead of a compare-and-select) halves that to
``(p-1)//2 * l1``: one more bit of ``p`` for the same exactness. The shift is undone exactly with
a precomputed correction ``x @ M = (x - o) @ M + o * colsum(M)``.

``fp64`` / ``fp32`` (one float GEMM per product, limbs stacked along rows)
    Operands are shifted: ``d = x - o`` with a public offset ``o``; the correction
    ``o * colsum(M) mod p`` is precomputed.

    * one limb: ``o = (p-1)//2`` so ``|d| <= (p-1)//2``. Exact when
      ``(p-1)//2 * l1 + (p-1) < 2**mantissa`` (53 for fp64, 24 for fp32); the ``+ (p-1)`` is the
      correction, folded into the GEMM as one extra input column of ones.
    * k limbs otherwise: ``x = sum_t u_t 2**(b t)`` with unsigned ``b``-bit digits ``u_t``,
      ``d_t = u_t - 2**(b-1)``, ``b`` the largest with ``2**(b-1) * l1 < 2**mantissa``,
      ``k = ceil(bits(p) / b)``. The ``k`` digit matrices are stacked into one
      ``(k*n, K) @ (K, N)`` GEMM and recombined in int64 with Horner's rule and a reduction mod
      ``p`` only where the next step could overflow
      (:func:`~shieldtune.shielded.freivalds.horner_mod`).

    ``fp32`` also needs IEEE float32 matmuls (no TF32 / bf16 reduced precision): it is refused
    while ``torch.get_float32_matmul_precision() != "highest"`` or CUDA TF32 is allowed.

``int8`` (``torch._int_mm``: int8 x int8 -> int32)
    ``x`` is read as its low ``k = ceil(bits(p)/8)`` little-endian bytes ``u_t`` (a free view of
    the int64 tensor), shifted to int8 digits ``d_t = u_t - 128``. The weight is split into
    ``kw`` balanced int8 digits (``kw = 1`` for ``w_bits <= 8``, 2 up to 15 bits, 3 for 16).
    All products ``d_s @ M_u`` come from ONE ``_int_mm`` of the row-stacked digits
    ``(k*n, K)`` by the column-stacked weight digits ``(K, kw*N)``. Exact when every int32
    partial sum fits: ``128 * l1(M_u) < 2**31`` for each weight digit. Recombination: runs of
    consecutive limb terms are merged in int32 while their bound stays below ``2**31``, then
    Horner in int64, plus the precomputed ``128 * sum_t 2**(8t) * colsum(M) mod p``. The cost
    grows with ``ceil(bits(p)/8)`` (4 limbs for ``p < 2**32``, 5 below ``2**40``).
    On CUDA, shapes are zero-padded to ``_int_mm``'s constraints (rows > 16, K and N multiples
    of 8) and sliced back.

:func:`probe` times every supported backend on the model's own shapes (forward + backward),
verifies each result with a Freivalds check (a kernel that returns a wrong product on this
device is listed as unsupported), and picks the fastest. :func:`probe_cached` stores the result
per machine, torch version, device, field and shapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shieldtune.errors import ConfigError, EncodingError
from shieldtune.registry import Registry
from shieldtune.shielded.field import Field, QuantizedWeight
from shieldtune.shielded.freivalds import FreivaldsCheck, horner_mod

__all__ = [
    "PreparedWeight",
    "ExactGemm",
    "FloatGemm",
    "Int8Gemm",
    "GEMM_BACKENDS",
    "ProbeResult",
    "probe",
    "probe_cached",
    "resolve_backend",
    "machine_fingerprint",
]

log = logging.getLogger(__name__)

_INT32_MAX = (1 << 31) - 1


# ---------------------------------------------------------------------------------------------
# Prepared weights
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """How one direction's masked operand is split.

    Attributes:
        limbs: Number of digit matrices ``k``.
        limb_bits: Bits between consecutive digits (Horner shift).
        offset: Public offset subtracted from every digit.
        aug: One-limb float plan with the correction folded into the GEMM.
        term_bound: Bound on every recombination term's magnitude.
    """

    limbs: int
    limb_bits: int
    offset: int
    aug: bool
    term_bound: int


@dataclass(frozen=True, eq=False)
class _Operand:
    """One direction ``a (n, K) @ mat -> (n, N)`` in backend-specific form."""

    k_dim: int  # K (real, unpadded)
    n_dim: int  # N (real, unpadded)
    mat: Tensor  # float: (K[+1], N); int8: (K_pad, kw*N padded)
    corr: Tensor | None  # int64 (N,) in [0, p): offset correction (None when folded in)
    plan: _Plan
    weight_limbs: int = 1  # int8 only
    k_pad: int = 0  # int8 only: padded K
    min_rows: int = 0  # int8 only: pad the stacked digit rows to at least this many


@dataclass(frozen=True, eq=False)
class PreparedWeight:
    """Backend-specific forms of ``w_int`` for both directions, on one device.

    Attributes:
        backend: Name of the backend that prepared it (only that one can use it).
        p: The field modulus.
        out_features: Rows of ``w_int``.
        in_features: Columns of ``w_int``.
        device: Where the forms live; inputs must be on it.
        fwd: Form for ``x @ w_intᵀ``.
        bwd: Form for ``g @ w_int``.
    """

    backend: str
    p: int
    out_features: int
    in_features: int
    device: torch.device
    fwd: _Operand
    bwd: _Operand

    def describe(self) -> str:
        """One line: backend, limbs per direction (for logs and reports)."""
        return (
            f"{self.backend}: forward {self.fwd.plan.limbs}x{self.fwd.weight_limbs} limbs, "
            f"backward {self.bwd.plan.limbs}x{self.bwd.weight_limbs} limbs"
        )


def _exact_corr(offset_sum: int, colsum: list[int], p: int, device: torch.device) -> Tensor:
    """``(offset_sum * colsum[i]) mod p`` with Python ints, as int64 on ``device``."""
    c = offset_sum % p
    return torch.tensor([(c * s) % p for s in colsum], dtype=torch.int64, device=device)


def _device(device: Any) -> torch.device:
    d = torch.device(device if device is not None else "cpu")
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def _device_reason(device: torch.device) -> str | None:
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    return f"device type {device.type!r} is not supported (cpu or cuda)"


def _check_input(pw: PreparedWeight, form: _Operand, a: Tensor, backend: str) -> None:
    if pw.backend != backend:
        raise EncodingError(f"weight was prepared by backend {pw.backend!r}, not {backend!r}")
    if a.dtype != torch.int64 or a.ndim != 2 or a.shape[1] != form.k_dim:
        raise EncodingError(
            f"expected int64 field elements of shape (n, {form.k_dim}), "
            f"got {a.dtype} {tuple(a.shape)}"
        )
    if a.device != pw.device:
        raise EncodingError(f"input is on {a.device}, the prepared weight on {pw.device}")


# ---------------------------------------------------------------------------------------------
# Backend interface
# ---------------------------------------------------------------------------------------------


class ExactGemm(ABC):
    """An exact modular GEMM backend (see the module docstring for the guarantees).

    Attributes:
        name: Registry name.
    """

    name: str

    @abstractmethod
    def supports(self, field: Field, qw: QuantizedWeight, device: Any) -> str | None:
        """Whether this backend is exact for ``field``, ``qw`` and ``device``.

        Args:
            field: The field.
            qw: The quantized weight.
            device: Target device.

        Returns:
            None if supported, else the reason it is not.
        """

    @abstractmethod
    def prepare(self, qw: QuantizedWeight, field: Field, device: Any) -> PreparedWeight:
        """Precompute the weight's forms on ``device``.

        Args:
            qw: The quantized weight.
            field: The field.
            device: Target device.

        Returns:
            The :class:`PreparedWeight`.

        Raises:
            EncodingError: Not supported (the reason is in the message).
        """

    @abstractmethod
    def _apply(self, pw: PreparedWeight, form: _Operand, a: Tensor) -> Tensor: ...

    def forward(self, pw: PreparedWeight, x: Tensor) -> Tensor:
        """``(x @ w_intᵀ) mod p``, exact.

        Args:
            pw: Prepared by this backend.
            x: int64 ``(n, in)`` in ``[0, p)`` on ``pw.device``.

        Returns:
            int64 ``(n, out)`` in ``[0, p)``.

        Raises:
            EncodingError: Wrong backend, dtype, shape or device.
        """
        _check_input(pw, pw.fwd, x, self.name)
        return self._apply(pw, pw.fwd, x)

    def backward(self, pw: PreparedWeight, g: Tensor) -> Tensor:
        """``(g @ w_int) mod p``, exact.

        Args:
            pw: Prepared by this backend.
            g: int64 ``(n, out)`` in ``[0, p)`` on ``pw.device``.

        Returns:
            int64 ``(n, in)`` in ``[0, p)``.

        Raises:
            EncodingError: Wrong backend, dtype, shape or device.
        """
        _check_input(pw, pw.bwd, g, self.name)
        return self._apply(pw, pw.bwd, g)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# ---------------------------------------------------------------------------------------------
# Float backends (fp64, fp32)
# ---------------------------------------------------------------------------------------------


def _float_plan(p: int, l1: int, mantissa: int) -> _Plan | None:
    """Limb plan with every partial sum below ``2**mantissa``; None if impossible."""
    l1e = max(l1, 1)
    half = (p - 1) // 2
    exact = 1 << mantissa
    pb = (p - 1).bit_length()
    if half * l1e + (p - 1) < exact:
        return _Plan(limbs=1, limb_bits=pb, offset=half, aug=True, term_bound=half * l1e + p)
    b = ((exact - 1) // l1e).bit_length()  # largest b with 2**(b-1) * l1 < 2**mantissa
    if b < 1 or l1e >= exact:
        return None
    b = min(b, pb)
    k = math.ceil(pb / b)
    return _Plan(
        limbs=k, limb_bits=b, offset=1 << (b - 1), aug=False, term_bound=(1 << (b - 1)) * l1e
    )


def _fp32_ieee_reason(device: torch.device) -> str | None:
    prec = torch.get_float32_matmul_precision()
    if prec != "highest":
        return f"float32 matmul precision is {prec!r} (needs 'highest' for exact fp32 GEMMs)"
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "CUDA TF32 matmuls are allowed (torch.backends.cuda.matmul.allow_tf32)"
    for mod in (torch.backends, getattr(torch.backends.cuda, "matmul", None)):
        fp = getattr(mod, "fp32_precision", None)
        if fp not in (None, "none", "ieee"):
            return f"fp32_precision is {fp!r} (needs IEEE float32 for exact fp32 GEMMs)"
    mk = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    fp = getattr(mk, "fp32_precision", None)
    if fp not in (None, "none", "ieee"):
        return f"mkldnn fp32_precision is {fp!r} (needs IEEE float32 for exact fp32 GEMMs)"
    return None


class FloatGemm(ExactGemm):
    """Exact modular GEMM with IEEE float GEMMs on limbs (see the module docstring).

    Args:
        name: Registry name.
        dtype: ``torch.float64`` or ``torch.float32``.
    """

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype
        self.mantissa = {torch.float64: 53, torch.float32: 24}[dtype]  # significand bits

    def _plans(self, field: Field, qw: QuantizedWeight) -> tuple[_Plan | None, _Plan | None]:
        return (
            _float_plan(field.p, qw.row_l1, self.mantissa),
            _float_plan(field.p, qw.col_l1, self.mantissa),
        )

    def supports(self, field: Field, qw: QuantizedWeight, device: Any) -> str | None:
        """See :meth:`ExactGemm.supports`."""
        dev = _device(device)
        reason = _device_reason(dev)
        if reason:
            return reason
        if self.dtype == torch.float32:
            reason = _fp32_ieee_reason(dev)
            if reason:
                return reason
        fwd, bwd = self._plans(field, qw)
        for plan, l1, what in ((fwd, qw.row_l1, "row_l1"), (bwd, qw.col_l1, "col_l1")):
            if plan is None:
                return (
                    f"weight {what}={l1} >= 2**{self.mantissa}: not even 1-bit limbs keep "
                    f"{self.name} partial sums exact"
                )
        return None

    def prepare(self, qw: QuantizedWeight, field: Field, device: Any) -> PreparedWeight:
        """See :meth:`ExactGemm.prepare`."""
        reason = self.supports(field, qw, device)
        if reason:
            raise EncodingError(f"{self.name} GEMM backend unsupported: {reason}")
        dev = _device(device)
        p = field.p
        fwd_plan, bwd_plan = self._plans(field, qw)
        w = qw.w_int.to(dev)
        wf = w.to(self.dtype)  # exact: |w| < 2**15
        rowsum = [int(v) for v in w.sum(dim=1).tolist()]  # (out,): colsums of w_intᵀ
        colsum = [int(v) for v in w.sum(dim=0).tolist()]  # (in,): colsums of w_int

        def form(plan: _Plan, mat: Tensor, sums: list[int]) -> _Operand:
            k_dim, n_dim = mat.shape
            osum = plan.offset * sum(1 << (plan.limb_bits * t) for t in range(plan.limbs))
            corr = _exact_corr(osum, sums, p, dev)
            if plan.aug:  # fold the correction into the GEMM: one extra row (K+1, N)
                mat = torch.cat([mat, corr.to(self.dtype)[None, :]], dim=0).contiguous()
                corr = None
            return _Operand(k_dim=k_dim, n_dim=n_dim, mat=mat, corr=corr, plan=plan)

        return PreparedWeight(
            backend=self.name,
            p=p,
            out_features=qw.out_features,
            in_features=qw.in_features,
            device=dev,
            fwd=form(fwd_plan, wf.t(), rowsum),  # (in, out)
            bwd=form(bwd_plan, wf, colsum),  # (out, in)
        )

    def _apply(self, pw: PreparedWeight, form: _Operand, a: Tensor) -> Tensor:
        if self.dtype == torch.float32:
            reason = _fp32_ieee_reason(pw.device)
            if reason:
                raise EncodingError(f"fp32 GEMM no longer exact: {reason}")
        p, plan = pw.p, form.plan
        n, k_dim = a.shape
        if n == 0 or k_dim == 0:
            return torch.zeros((n, form.n_dim), dtype=torch.int64, device=a.device)
        if plan.aug:
            # d = x - (p-1)/2 in [-(p-1)/2, (p-1)/2], plus a column of ones for the correction
            buf = torch.empty((n, k_dim + 1), dtype=self.dtype, device=a.device)
            torch.sub(a, plan.offset, out=buf[:, :k_dim])
            buf[:, k_dim] = 1
            y = buf @ form.mat  # (n, N): exact integers, |y| < 2**mantissa
            return torch.remainder(y, p, out=y).to(torch.int64)  # fmod is exact
        k, b = plan.limbs, plan.limb_bits
        low = (1 << b) - 1
        buf = torch.empty((k, n, k_dim), dtype=self.dtype, device=a.device)
        for t in range(k):  # digit t: ((x >> bt) & (2**b - 1)) - 2**(b-1)
            torch.sub((a >> (b * t)) & low, plan.offset, out=buf[t])
        y = (buf.view(k * n, k_dim) @ form.mat).to(torch.int64).view(k, n, form.n_dim)
        return horner_mod(list(y.unbind(0)), b, plan.term_bound, p, form.corr)


# ---------------------------------------------------------------------------------------------
# int8 backend (torch._int_mm)
# ---------------------------------------------------------------------------------------------


def _balanced_bytes(w: Tensor, limbs: int) -> list[Tensor]:
    """Digits ``d_u`` in ``[-128, 127]`` with ``w = sum_u d_u 256**u``."""
    digits = []
    r = w
    for _ in range(limbs):
        d = ((r + 128) & 255) - 128
        digits.append(d)
        r = (r - d) >> 8
    if bool((r != 0).any()):
        raise EncodingError("weight does not fit its int8 limbs")  # cannot happen for w_bits<=16
    return digits


def _weight_limbs(w_bits: int) -> int:
    qmax = (1 << (w_bits - 1)) - 1
    kw = 1
    while 127 * ((1 << (8 * kw)) - 1) // 255 < qmax:
        kw += 1
    return kw


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _int_mm_pads(device: torch.device) -> bool:
    """Whether ``_int_mm`` on ``device`` needs rows > 16 and K, N multiples of 8 (CUDA)."""
    return device.type == "cuda"


class Int8Gemm(ExactGemm):
    """Exact modular GEMM on int8 byte limbs with ``torch._int_mm`` (module docstring)."""

    name = "int8"

    def _limb_l1(self, qw: QuantizedWeight) -> tuple[list[int], list[int]]:
        kw = _weight_limbs(qw.w_bits)
        digits = _balanced_bytes(qw.w_int.to("cpu"), kw)
        row = [int(d.abs().sum(dim=1).max()) if d.numel() else 0 for d in digits]
        col = [int(d.abs().sum(dim=0).max()) if d.numel() else 0 for d in digits]
        return row, col

    def supports(self, field: Field, qw: QuantizedWeight, device: Any) -> str | None:
        """See :meth:`ExactGemm.supports`."""
        dev = _device(device)
        reason = _device_reason(dev)
        if reason:
            return reason
        if not hasattr(torch, "_int_mm"):
            return "torch._int_mm is not available in this torch build"
        if sys.byteorder != "little":
            return "the int8 byte-limb view needs a little-endian host"
        row, col = self._limb_l1(qw)
        for l1s, what in ((row, "row"), (col, "col")):
            worst = max(l1s, default=0)
            if 128 * worst > _INT32_MAX:
                return (
                    f"int32 accumulation could overflow: 128 * {what} L1 of an int8 weight limb "
                    f"= {128 * worst} >= 2**31"
                )
        return None

    def prepare(self, qw: QuantizedWeight, field: Field, device: Any) -> PreparedWeight:
        """See :meth:`ExactGemm.prepare`."""
        reason = self.supports(field, qw, device)
        if reason:
            raise EncodingError(f"int8 GEMM backend unsupported: {reason}")
        dev = _device(device)
        p = field.p
        kx = math.ceil((p - 1).bit_length() / 8)
        kw = _weight_limbs(qw.w_bits)
        row_l1, col_l1 = self._limb_l1(qw)
        w = qw.w_int.to(dev)
        digits = _balanced_bytes(w, kw)  # kw x (out, in) in [-128, 127]
        pad = _int_mm_pads(dev)
        osum = 128 * sum(1 << (8 * t) for t in range(kx))

        def form(mats: list[Tensor], l1s: list[int], sums: list[int]) -> _Operand:
            k_dim, n_dim = mats[0].shape
            k_pad = _round_up(k_dim, 8) if pad else k_dim
            cols = kw * n_dim
            cols_pad = _round_up(cols, 8) if pad else cols
            mat = torch.zeros((k_pad, cols_pad), dtype=torch.int8, device=dev)
            for u, m in enumerate(mats):  # weight digit u -> columns [u*N, (u+1)*N)
                mat[:k_dim, u * n_dim : (u + 1) * n_dim] = m
            # Horner term e sums the products d_s @ M_u with s + u = e
            bound = max(
                sum(128 * l1s[u] for u in range(kw) if 0 <= e - u < kx) for e in range(kx + kw - 1)
            )
            plan = _Plan(limbs=kx, limb_bits=8, offset=128, aug=False, term_bound=max(bound, 1))
            corr = _exact_corr(osum, sums, p, dev)
            return _Operand(
                k_dim, n_dim, mat, corr, plan, weight_limbs=kw, k_pad=k_pad, min_rows=17 * pad
            )

        rowsum = [int(v) for v in w.sum(dim=1).tolist()]
        colsum = [int(v) for v in w.sum(dim=0).tolist()]
        return PreparedWeight(
            backend=self.name,
            p=p,
            out_features=qw.out_features,
            in_features=qw.in_features,
            device=dev,
            fwd=form([d.t() for d in digits], row_l1, rowsum),  # (in, out) per digit
            bwd=form(digits, col_l1, colsum),  # (out, in) per digit
        )

    def _apply(self, pw: PreparedWeight, form: _Operand, a: Tensor) -> Tensor:
        p, kx, kw = pw.p, form.plan.limbs, form.weight_limbs
        n, k_dim = a.shape
        n_dim = form.n_dim
        if n == 0 or k_dim == 0:
            return torch.zeros((n, n_dim), dtype=torch.int64, device=a.device)
        rows = kx * n
        rows_pad = max(rows, form.min_rows)
        padded = rows_pad != rows or form.k_pad != k_dim
        alloc = torch.zeros if padded else torch.empty
        buf = alloc((rows_pad, form.k_pad), dtype=torch.uint8, device=a.device)
        # low kx little-endian bytes of each x, limb-major: (kx, n, K); digit = byte - 128
        xb = a.contiguous().view(torch.uint8).view(n, k_dim, 8)[:, :, :kx].permute(2, 0, 1)
        torch.bitwise_xor(xb, 0x80, out=buf[:rows, :k_dim].unflatten(0, (kx, n)))
        y = torch._int_mm(buf.view(torch.int8), form.mat)  # (rows_pad, cols_pad) int32, exact
        y = y[:rows].view(kx, n, -1)
        terms = []
        for e in range(kx + kw - 1):
            z = None
            for u in range(max(0, e - kx + 1), min(e, kw - 1) + 1):
                part = y[e - u, :, u * n_dim : (u + 1) * n_dim]
                z = part if z is None else z.to(torch.int64) + part
            terms.append(z)
        # Merge runs of gs consecutive terms in int32 while the merged bound still fits
        # (cheaper passes than int64); Horner in int64 then runs over the merged terms.
        bound, gs = form.plan.term_bound, 1
        while gs < len(terms) and bound * (((1 << (8 * (gs + 1))) - 1) // 255) <= _INT32_MAX:
            gs += 1
        if gs > 1:
            merged = []
            for i in range(0, len(terms), gs):
                run = terms[i : i + gs]
                acc = run[-1]
                for z in reversed(run[:-1]):
                    # in place in our own product buffer; |acc| <= merged bound < 2**31
                    acc = torch.add(z, acc, alpha=256, out=acc)
                merged.append(acc)
            terms, bound = merged, bound * (((1 << (8 * gs)) - 1) // 255)
        return horner_mod(terms, 8 * gs, bound, p, form.corr)


# ---------------------------------------------------------------------------------------------
# Registry, probe, cache
# ---------------------------------------------------------------------------------------------

GEMM_BACKENDS: Registry[ExactGemm] = Registry("exact GEMM backend")
GEMM_BACKENDS.register("fp64", FloatGemm("fp64", torch.float64))
GEMM_BACKENDS.register("fp32", FloatGemm("fp32", torch.float32))
GEMM_BACKENDS.register("int8", Int8Gemm())


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of :func:`probe`.

    Attributes:
        choice: Name of the fastest supported backend.
        timings_ms: Per backend, forward + backward over all weights (best of ``repeats``).
        unsupported: Backend name -> reason (not exact here, or failed verification).
        device: Device the probe ran on.
        machine: Human-readable machine description.
        from_cache: Whether :func:`probe_cached` read this from its cache file.
    """

    choice: str
    timings_ms: dict[str, float]
    unsupported: dict[str, str]
    device: str
    machine: str
    from_cache: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict (without ``from_cache``)."""
        d = dataclasses.asdict(self)
        d.pop("from_cache")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProbeResult:
        """Rebuild and validate a result read from JSON.

        Raises:
            ValueError: The dict is malformed or names an unknown backend.
        """
        timings = {str(k): float(v) for k, v in dict(d["timings_ms"]).items()}
        unsupported = {str(k): str(v) for k, v in dict(d["unsupported"]).items()}
        choice = str(d["choice"])
        if choice not in GEMM_BACKENDS or choice not in timings:
            raise ValueError(f"cached choice {choice!r} is not a timed backend")
        if any(not math.isfinite(v) or v < 0 for v in timings.values()):
            raise ValueError("bad cached timings")
        return cls(
            choice=choice,
            timings_ms=timings,
            unsupported=unsupported,
            device=str(d["device"]),
            machine=str(d["machine"]),
        )


def _cpuinfo() -> tuple[str, str]:
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = val.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(val.split()))
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def machine_fingerprint(device: Any = "cpu") -> dict[str, Any]:
    """What the probe's timings depend on: CPU model and flags, threads, torch, device.

    Args:
        device: The device probed.

    Returns:
        A JSON-able dict.
    """
    dev = _device(device)
    model, flags = _cpuinfo()
    fp: dict[str, Any] = {
        "cpu": model,
        "arch": platform.machine(),
        "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(dev.type),
    }
    if dev.type == "cuda":
        fp["device_name"] = torch.cuda.get_device_name(dev)
        fp["capability"] = list(torch.cuda.get_device_capability(dev))
        fp["cuda"] = torch.version.cuda
    return fp


def _describe_machine(fp: dict[str, Any]) -> str:
    dev = fp.get("device_name", fp["device"])
    return (
        f"{fp['cpu']} ({fp['arch']}, flags {fp['cpu_flags_sha256']}, {fp['threads']} threads), "
        f"device {dev}, torch {fp['torch']}"
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(
    field: Field,
    qws: Sequence[QuantizedWeight],
    rows: int,
    device: Any,
    candidates: Sequence[str] | None = None,
    repeats: int = 3,
) -> ProbeResult:
    """Time every supported backend on the model's own weights and keep the fastest.

    Weights are grouped by ``(out, in, w_bits)``; per group the weight with the largest L1
    bounds (the most limbs) is timed and its time counted once per group member. Each candidate
    first runs forward and backward once per timed weight on ``rows`` rows of random field
    elements (a warm-up whose results are verified with a Freivalds check; a wrong result makes
    the backend unsupported), then ``repeats`` timed rounds; the best round per weight counts.
    Every weight (not only the timed ones) must be supported.

    Args:
        field: The field.
        qws: The quantized weights (distinct shapes suffice).
        rows: Rows per product (tokens per micro-batch).
        device: Where the GEMMs run.
        candidates: Backend names to try (default: all registered).
        repeats: Timed rounds per backend.

    Returns:
        The :class:`ProbeResult`.

    Raises:
        ConfigError: An unknown candidate name.
        EncodingError: No candidate is supported (the reasons are listed).
    """
    dev = _device(device)
    names = sorted(set(candidates)) if candidates is not None else GEMM_BACKENDS.names()
    backends = {name: GEMM_BACKENDS.get(name, field="gemm backend") for name in names}
    p = field.p
    # Time one weight per (out, in, w_bits), the one with the largest L1 bounds (the most
    # limbs, so the slowest), weighted by how many weights share that shape.
    groups: dict[tuple[int, int, int], list[QuantizedWeight]] = {}
    for qw in qws:
        groups.setdefault((qw.out_features, qw.in_features, qw.w_bits), []).append(qw)
    reps = [max(g, key=lambda q: (max(q.row_l1, q.col_l1), q.row_l1)) for g in groups.values()]
    counts = [len(g) for g in groups.values()]
    gen = torch.Generator().manual_seed(0)  # probe inputs are public random data
    inputs = [
        (
            torch.randint(0, p, (rows, qw.in_features), generator=gen).to(dev),
            torch.randint(0, p, (rows, qw.out_features), generator=gen).to(dev),
        )
        for qw in reps
    ]
    checks: list[FreivaldsCheck] | None = None
    timings: dict[str, float] = {}
    unsupported: dict[str, str] = {}
    for name, be in backends.items():
        reason = next((r for qw in qws if (r := be.supports(field, qw, dev))), None)
        if reason:
            unsupported[name] = reason
            continue
        pws = [be.prepare(qw, field, dev) for qw in reps]
        if checks is None:
            checks = [FreivaldsCheck(qw, field) for qw in reps]
        ok = True
        for pw, (x, g), chk in zip(pws, inputs, checks, strict=True):
            if not (
                chk.check_forward(x, be.forward(pw, x))
                and chk.check_backward(g, be.backward(pw, g))
            ):
                ok = False
        if not ok:
            unsupported[name] = f"wrong result on {dev} (Freivalds check failed)"
            continue
        best = [math.inf] * len(reps)
        for _ in range(max(1, repeats)):
            for i, (pw, (x, g)) in enumerate(zip(pws, inputs, strict=True)):
                _sync(dev)
                t0 = time.perf_counter()
                be.forward(pw, x)
                be.backward(pw, g)
                _sync(dev)
                best[i] = min(best[i], time.perf_counter() - t0)
        timings[name] = 1e3 * sum(c * t for c, t in zip(counts, best, strict=True))
    if not timings:
        raise EncodingError(
            "no exact GEMM backend is supported: "
            + "; ".join(f"{k}: {v}" for k, v in unsupported.items())
        )
    choice = min(sorted(timings), key=timings.__getitem__)
    return ProbeResult(
        choice=choice,
        timings_ms=timings,
        unsupported=unsupported,
        device=str(dev),
        machine=_describe_machine(machine_fingerprint(dev)),
    )


def _cache_key(
    field: Field, qws: Sequence[QuantizedWeight], rows: int, device: Any, names: list[str]
) -> dict[str, Any]:
    return {
        "version": 1,
        "machine": machine_fingerprint(device),
        "p": field.p,
        "rows": rows,
        "shapes": [
            [qw.out_features, qw.in_features, qw.w_bits, qw.row_l1, qw.col_l1] for qw in qws
        ],
        "candidates": names,
    }


def probe_cached(
    field: Field,
    qws: Sequence[QuantizedWeight],
    rows: int,
    device: Any,
    candidates: Sequence[str] | None = None,
    repeats: int = 3,
    cache_dir: Path | str | None = None,
) -> ProbeResult:
    """:func:`probe`, with the result cached as JSON in ``cache_dir``.

    The key is the machine fingerprint (CPU model, CPU flags hash, threads, torch version,
    device name), ``p``, ``rows``, the weights' shapes / bit widths / L1 bounds and the
    candidates. A matching, well-formed file is reused (``from_cache=True``); a missing,
    mismatched or corrupted file is ignored and rewritten atomically (temp file +
    ``os.replace``). A cache that cannot be written only logs a warning.

    Args:
        field: The field.
        qws: The quantized weights.
        rows: Rows per product.
        device: Where the GEMMs run.
        candidates: Backend names to try (default: all registered).
        repeats: Timed rounds per backend.
        cache_dir: Folder of the cache files (required).

    Returns:
        The :class:`ProbeResult`.

    Raises:
        ValueError: No ``cache_dir``.
        ConfigError: An unknown candidate name.
        EncodingError: No candidate is supported.
    """
    if cache_dir is None:
        raise ValueError("probe_cached needs a cache_dir")
    cache_dir = Path(cache_dir)
    names = sorted(set(candidates)) if candidates is not None else GEMM_BACKENDS.names()
    key = _cache_key(field, qws, rows, device, names)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir / f"gemm_probe_{digest}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["key"] == key:
            cached = ProbeResult.from_json(data["result"])
            if cached.choice in names:
                return dataclasses.replace(cached, from_cache=True)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("ignoring unreadable GEMM probe cache %s: %s", path, err)
    result = probe(field, qws, rows, device, names, repeats)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".gemm_probe_", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"key": key, "result": result.to_json()}, f, indent=2, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        log.warning("could not write GEMM probe cache %s: %s", path, err)
    return result


def resolve_backend(name: str | None, probe_result: ProbeResult | None) -> ExactGemm:
    """The backend to use: ``name`` overrides the probe; None or ``"auto"`` takes its choice.

    Args:
        name: A registered backend name, ``"auto"`` or None.
        probe_result: The probe's result (needed for ``"auto"``).

    Returns:
        The :class:`ExactGemm`.

    Raises:
        ConfigError: Unknown name (the message lists the choices), or ``"auto"`` without a
            probe result.
    """
    accepted = ", ".join(["auto", *GEMM_BACKENDS.names()])
    if name is None or name == "auto":
        if probe_result is None:
            raise ConfigError(f"gemm backend 'auto' needs a probe result; accepted: {accepted}")
        name = probe_result.choice
    if name not in GEMM_BACKENDS:
        raise ConfigError(f"unknown exact GEMM backend {name!r}; accepted: {accepted}")
    return GEMM_BACKENDS.get(name)
