"""Freivalds' check over F_p: the TEE verifies products returned by the untrusted accelerator.

For a frozen weight ``w_int`` (``out x in``) the enclave keeps secret vectors only::

    forward   y ≟ x · w_intᵀ   (n x out):  y · r_out  ==  x · v_in    v_in  = w_intᵀ r_out  (mod p)
    backward  y ≟ g · w_int    (n x in):   y · r_in   ==  g · v_out   v_out = w_int  r_in   (mod p)

checked row by row, exactly. If a returned row differs from the true one, the row check passes
with probability ``1/p`` over the secret ``r`` (a non-zero linear form vanishes on ``1/p`` of
F_p), so a wrong product passes with probability at most ``p**-repetitions``. The secret vectors
are drawn once from a cryptographic source and reused across checks, as in Slalom (Tramèr &
Boneh, ICLR 2019): the accelerator only ever learns pass/fail, and a failure aborts the run, so
it gets no second try against the same ``r``.

A returned product that is malformed (wrong shape or dtype, or any value outside ``[0, p)``) is
a failed check (``False``), never an exception: it is the untrusted party's fault. A malformed
*trusted* operand (``x`` or ``g`` from the enclave itself) is a programming error and raises
``ValueError``.

All products are exact: :func:`modmatmul` splits the operands into limbs so that every
partial sum of its float64 GEMM stays below ``2**53`` and recombines the limbs in int64 without
overflow. Works on CPU and CUDA tensors.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from shieldtune.shielded.field import Field, QuantizedWeight, to_field
from shieldtune.shielded.masks import uniform_from_bytes

__all__ = ["FreivaldsCheck", "modmatmul", "modmatvec", "horner_mod"]

_INT64_MAX = (1 << 63) - 1
_F64_EXACT = 1 << 53
_CHUNK_BYTES = 1 << 26  # bound on the float64 limb buffer of one row chunk


def horner_mod(
    terms: list[Tensor], shift: int, term_bound: int, p: int, corr: Tensor | None = None
) -> Tensor:
    """``(sum_t terms[t] * 2**(shift*t) + corr) mod p`` in int64, never overflowing.

    Horner's rule from the top term down; the running value's magnitude bound is tracked in
    Python ints and the accumulator is reduced mod ``p`` only when the next step could
    overflow ``int64`` (for ``p * 2**shift >= 2**63`` the shift is split into smaller steps).

    Args:
        terms: Integer tensors (same shape), lowest weight first; ``|terms[t]| <= term_bound``.
        shift: Bits between consecutive terms.
        term_bound: Bound on every term's magnitude, ``< 2**62``.
        p: The modulus, ``< 2**62``.
        corr: Optional int64 tensor in ``[0, p)``, broadcastable, added at the end.

    Returns:
        int64 tensor in ``[0, p)``.
    """
    if term_bound >= 1 << 62:
        raise ValueError(f"horner_mod term bound {term_bound} too large")
    pb = (p - 1).bit_length()
    # The accumulator is our own copy and is updated in place (no fresh allocation per step).
    acc = terms[-1].to(torch.int64, copy=True)
    bound = term_bound
    for z in reversed(terms[:-1]):
        rem = shift
        while (bound << rem) + term_bound > _INT64_MAX:
            if bound > p - 1:
                acc.remainder_(p)
                bound = p - 1
                continue
            s = min(rem, 63 - pb)  # (p - 1) << s < 2**63
            acc.mul_(1 << s).remainder_(p)
            bound = p - 1
            rem -= s
        torch.add(z, acc, alpha=1 << rem, out=acc)  # acc <- z + acc * 2**rem, int64
        bound = (bound << rem) + term_bound
    if corr is not None:
        if bound + p - 1 > _INT64_MAX:
            acc.remainder_(p)
        acc.add_(corr)
    return acc.remainder_(p)


def _limb_bits(k: int) -> int:
    """Largest b with k * (2**b - 1)**2 < 2**53 (every partial sum of a limb GEMM exact)."""
    b = 26
    while b > 1 and max(k, 1) * ((1 << b) - 1) ** 2 >= _F64_EXACT:
        b -= 1
    return b


def _v_limbs(v: Tensor, bits: int, limbs: int) -> Tensor:
    """Unsigned ``bits``-bit limbs of ``v (k, m)`` as float64 ``(k, limbs*m)``, limb-major."""
    k, m = v.shape
    low = (1 << bits) - 1
    vd = torch.empty((k, limbs, m), dtype=torch.float64, device=v.device)
    for t in range(limbs):
        vd[:, t, :] = (v >> (bits * t)) & low
    return vd.view(k, limbs * m)


def modmatmul(a: Tensor, v: Tensor, p: int) -> Tensor:
    """Exact ``(a @ v) mod p`` for field elements, via one float64 GEMM per row chunk.

    Every partial sum of the float64 GEMM is an integer below ``2**53``, hence exact:

    * ``p - 1 < 2**53`` and ``k * (p - 1) * (2**c - 1) < 2**53`` for some ``c >= 1``: ``a`` is
      used as is and only ``v`` is split into ``ceil(bits(p) / c)`` limbs of ``c`` bits (the big
      operand is read once; the usual Freivalds case);
    * otherwise both are split into ``L = ceil(bits(p) / b)`` limbs of ``b`` bits with
      ``k * (2**b - 1)**2 < 2**53``, multiplied as ``(L*rows, k) @ (k, L*m)``.

    Limb products are recombined in int64 by :func:`horner_mod`.

    Args:
        a: int64 ``(n, k)`` with values in ``[0, p)``.
        v: int64 ``(k, m)`` with values in ``[0, p)``, same device.
        p: The modulus, ``< 2**62``.

    Returns:
        int64 ``(n, m)`` in ``[0, p)`` on ``a``'s device.
    """
    n, k = a.shape
    m = v.shape[1]
    if n == 0 or m == 0 or k == 0:
        return torch.zeros((n, m), dtype=torch.int64, device=a.device)
    pb = (p - 1).bit_length()
    dev = a.device
    q = (_F64_EXACT - 1) // (k * (p - 1))  # need 2**c - 1 <= q
    c = min((q + 1).bit_length() - 1, pb)  # largest c with k * (p - 1) * (2**c - 1) < 2**53
    if c >= 1:  # a whole, v in limbs: (rows, k) @ (k, nv*m)
        nv = math.ceil(pb / c)
        vd = _v_limbs(v, c, nv)
        rows = max(1, _CHUNK_BYTES // (8 * k))
        out = []
        for r0 in range(0, n, rows):
            ac = a[r0 : r0 + rows].to(torch.float64)  # exact: a < p <= 2**53
            r = (ac @ vd).to(torch.int64).view(-1, nv, m)  # (rc, nv, m) exact
            out.append(horner_mod(list(r.unbind(1)), c, k * (p - 1) * ((1 << c) - 1), p))
        return out[0] if len(out) == 1 else torch.cat(out)
    b = min(_limb_bits(k), pb)
    nl = math.ceil(pb / b)
    low = (1 << b) - 1
    vd = _v_limbs(v, b, nl)  # (k, nl*m)
    pair_bound = k * low * low  # < 2**53
    rows = max(1, _CHUNK_BYTES // (8 * nl * k))
    out = []
    for r0 in range(0, n, rows):
        ac = a[r0 : r0 + rows]
        rc = ac.shape[0]
        ad = torch.empty((nl, rc, k), dtype=torch.float64, device=dev)  # a limbs
        for s in range(nl):
            ad[s] = (ac >> (b * s)) & low
        r = (ad.view(nl * rc, k) @ vd).to(torch.int64).view(nl, rc, nl, m)  # exact
        terms = []
        for e in range(2 * nl - 1):
            z = None
            for s in range(max(0, e - nl + 1), min(e, nl - 1) + 1):
                z = r[s, :, e - s, :] if z is None else z + r[s, :, e - s, :]
            terms.append(z)
        out.append(horner_mod(terms, b, nl * pair_bound, p))
    return out[0] if len(out) == 1 else torch.cat(out)


def modmatvec(a: Tensor, v: Tensor, p: int) -> Tensor:
    """Exact ``(a @ v) mod p`` for a matrix and a vector of field elements.

    Args:
        a: int64 ``(n, k)`` in ``[0, p)``.
        v: int64 ``(k,)`` in ``[0, p)``.
        p: The modulus.

    Returns:
        int64 ``(n,)`` in ``[0, p)``.
    """
    return modmatmul(a, v.reshape(-1, 1), p).reshape(-1)


def _byte_source(generator: Any) -> Callable[[int], bytes]:
    if generator is None:
        return os.urandom
    if isinstance(generator, torch.Generator):
        raise TypeError(
            "Freivalds vectors must come from a cryptographic source, not a torch.Generator; "
            "pass None (os.urandom), secrets.SystemRandom(), or a callable n -> n random bytes"
        )
    if hasattr(generator, "randbytes"):  # random.SystemRandom (random.Random only in tests)
        return generator.randbytes
    if hasattr(generator, "token_bytes"):  # the secrets module
        return generator.token_bytes
    if callable(generator):
        return generator
    raise TypeError(f"unusable random source {generator!r}")


class FreivaldsCheck:
    """Secret-vector Freivalds checks of ``x·w_intᵀ`` and ``g·w_int`` over F_p.

    Stores only vectors (``repetitions`` columns each): ``r_out``, ``v_in`` (forward) and
    ``r_in``, ``v_out`` (backward), so it fits a small-memory enclave.

    Args:
        qw: The quantized frozen weight.
        field: The field.
        generator: Source of secret randomness: None (``os.urandom``, the default and the only
            choice for production), an object with ``randbytes(n)`` (``secrets.SystemRandom()``)
            or ``token_bytes(n)`` (the ``secrets`` module), or a callable ``n -> bytes``.
            A ``torch.Generator`` is refused (not cryptographic).
        repetitions: Independent secret vectors per check; soundness error ``p**-repetitions``.

    Raises:
        TypeError: ``generator`` is a torch.Generator or unusable.
        ValueError: ``repetitions < 1``.
    """

    def __init__(
        self,
        qw: QuantizedWeight,
        field: Field,
        generator: Any = None,
        repetitions: int = 1,
    ) -> None:
        if repetitions < 1:
            raise ValueError(f"repetitions must be >= 1, got {repetitions}")
        read = _byte_source(generator)
        p = field.p
        self.field = field
        self.repetitions = repetitions
        self.out_features, self.in_features = qw.out_features, qw.in_features
        w = to_field(qw.w_int.detach().to("cpu"), p)  # (out, in) in [0, p)
        reps = repetitions
        self._r_out = uniform_from_bytes(read, p, self.out_features * reps).view(-1, reps)
        self._r_in = uniform_from_bytes(read, p, self.in_features * reps).view(-1, reps)
        self._v_in = modmatmul(w.t().contiguous(), self._r_out, p)  # (in, reps) = wᵀ r_out
        self._v_out = modmatmul(w, self._r_in, p)  # (out, reps) = w r_in
        self._on: dict[torch.device, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def __repr__(self) -> str:  # never show the secret vectors
        return (
            f"FreivaldsCheck(p={self.field.p}, out={self.out_features}, "
            f"in={self.in_features}, repetitions={self.repetitions})"
        )

    def _vectors(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if device not in self._on:
            self._on[device] = tuple(  # type: ignore[assignment]
                t.to(device) for t in (self._r_out, self._v_in, self._r_in, self._v_out)
            )
        return self._on[device]

    def _check(self, a: Tensor, a_width: int, y: Tensor, y_width: int, r_idx: int) -> bool:
        p = self.field.p
        if not isinstance(a, Tensor) or a.ndim != 2 or a.shape[1] != a_width:
            raise ValueError(f"trusted operand must be (n, {a_width}), got {tuple(a.shape)}")
        if a.dtype != torch.int64:
            raise ValueError(f"trusted operand must be int64 field elements, got {a.dtype}")
        # The returned product is untrusted: anything malformed is a failed check.
        if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.ndim != 2:
            return False
        if tuple(y.shape) != (a.shape[0], y_width):
            return False
        y = y.to(a.device)
        if y.numel():
            lo, hi = torch.aminmax(y)
            if int(lo) < 0 or int(hi) >= p:
                return False
        r_out, v_in, r_in, v_out = self._vectors(a.device)
        r, v = (r_out, v_in) if r_idx == 0 else (r_in, v_out)
        return bool(torch.equal(modmatmul(y, r, p), modmatmul(a, v, p)))

    def check_forward(self, x: Tensor, y: Tensor) -> bool:
        """Whether ``y == x · w_intᵀ (mod p)`` (Freivalds, row by row).

        Args:
            x: int64 ``(n, in)`` in ``[0, p)``: the (masked) input the enclave sent.
            y: The accelerator's answer, expected int64 ``(n, out)`` in ``[0, p)``.

        Returns:
            True if every row passes; False on any mismatch or a malformed ``y``.

        Raises:
            ValueError: ``x`` is malformed (wrong width or dtype).
        """
        return self._check(x, self.in_features, y, self.out_features, 0)

    def check_backward(self, g: Tensor, y: Tensor) -> bool:
        """Whether ``y == g · w_int (mod p)`` (Freivalds, row by row).

        Args:
            g: int64 ``(n, out)`` in ``[0, p)``: the (masked) gradient the enclave sent.
            y: The accelerator's answer, expected int64 ``(n, in)`` in ``[0, p)``.

        Returns:
            True if every row passes; False on any mismatch or a malformed ``y``.

        Raises:
            ValueError: ``g`` is malformed (wrong width or dtype).
        """
        return self._check(g, self.out_features, y, self.in_features, 1)
