"""Prime-field arithmetic and exact fixed-point encodings for Method 1 (masked offload).

Everything here is pure and works on CPU and CUDA tensors alike (results live on the input's
device). Field elements are ``int64`` tensors holding values in ``[0, p)`` with ``p < 2**62``,
so the sum of two elements never overflows ``int64``.

The exactness contract of Method 1 (see ``DESIGN.md`` §2): a frozen linear map ``y = x Wᵀ`` is
computed on integers as ``x_int · w_intᵀ``; every integer result ``z`` satisfies
``|z| <= (2**bits - 1) * row_l1 <= (p - 1) // 2`` (checked by :func:`input_bits`), so the
*centered* residue :func:`from_field` of ``z mod p`` is ``z`` itself, bit for bit. Nothing wraps
silently: encodings that could exceed the range raise :class:`~shieldtune.errors.EncodingError`.

Encodings::

    W  ≈ σ[:, None] * w_int         (quantize_weight; per output channel, symmetric)
    x  ≈ s[:, None] * x_int         (encode_rows; per row, dynamic)
    y  = x Wᵀ ≈ (s ⊙ σ) · (x_int · w_intᵀ)          forward, bound by row_l1
    gx = g W  = (g diag σ) (diag σ⁻¹ W) ≈ (h_int · w_int) · s_h   with h = g * σ[None, :],
                                                     backward, bound by col_l1
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shieldtune.errors import EncodingError

__all__ = [
    "MAX_P",
    "is_prime",
    "largest_prime_below",
    "Field",
    "add_mod",
    "sub_mod",
    "to_field",
    "from_field",
    "check_field_range",
    "QuantizedWeight",
    "quantize_weight",
    "input_bits",
    "encode_rows",
    "decode_rows",
    "check_range",
]

#: Exclusive upper bound on the field modulus: two elements then add without int64 overflow.
MAX_P = 1 << 62

# Miller–Rabin with these bases is deterministic for every n < 3.317e24 (> 2**81).
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
_MR_LIMIT = 3_317_044_064_679_887_385_961_981


def is_prime(n: int) -> bool:
    """Deterministic primality test (Miller–Rabin with the first 12 prime bases).

    Args:
        n: The integer to test. Deterministic for every ``n < 3.3e24`` (so all of ``n < 2**64``).

    Returns:
        Whether ``n`` is prime.

    Raises:
        ValueError: ``n`` is so large that the fixed bases are no longer a proof.
    """
    n = int(n)
    if n < 2:
        return False
    for q in _MR_BASES:
        if n % q == 0:
            return n == q
    if n >= _MR_LIMIT:
        raise ValueError(f"is_prime is deterministic only below {_MR_LIMIT}; got {n}")
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def largest_prime_below(n: int) -> int:
    """The largest prime strictly smaller than ``n``.

    Args:
        n: Exclusive upper bound, ``n > 2``.

    Returns:
        The largest prime ``p < n``.

    Raises:
        ValueError: ``n <= 2`` (no prime below it).
    """
    if n <= 2:
        raise ValueError(f"there is no prime below {n}")
    c = n - 1
    while not is_prime(c):
        c -= 1
    return c


@dataclass(frozen=True)
class Field:
    """The prime field F_p used for masking.

    Args:
        p: A prime with ``2 < p < 2**62``.

    Raises:
        EncodingError: ``p`` is not an int, not prime, or out of range.
    """

    p: int

    def __post_init__(self) -> None:
        if not isinstance(self.p, int) or isinstance(self.p, bool):
            raise EncodingError(f"field modulus must be an int, got {type(self.p).__name__}")
        if not 2 < self.p < MAX_P:
            raise EncodingError(f"field modulus p={self.p} out of range: need 2 < p < 2**62")
        if not is_prime(self.p):
            raise EncodingError(f"field modulus p={self.p} is not prime")

    @property
    def bits(self) -> int:
        """Bit length of ``p``."""
        return self.p.bit_length()

    @property
    def half(self) -> int:
        """``(p - 1) // 2``: the largest magnitude a centered residue can represent."""
        return (self.p - 1) // 2


def add_mod(a: Tensor, b: Tensor, p: int) -> Tensor:
    """``(a + b) mod p`` for elements in ``[0, p)`` (one add, one conditional subtract).

    Args:
        a: int64 tensor with values in ``[0, p)``.
        b: int64 tensor (broadcastable to ``a``) with values in ``[0, p)``.
        p: The modulus, ``p < 2**62``.

    Returns:
        int64 tensor in ``[0, p)``.
    """
    s = a + b  # < 2p < 2**63
    return torch.where(s >= p, s - p, s)


def sub_mod(a: Tensor, b: Tensor, p: int) -> Tensor:
    """``(a - b) mod p`` for elements in ``[0, p)`` (one subtract, one conditional add).

    Args:
        a: int64 tensor with values in ``[0, p)``.
        b: int64 tensor (broadcastable to ``a``) with values in ``[0, p)``.
        p: The modulus.

    Returns:
        int64 tensor in ``[0, p)``.
    """
    d = a - b  # in (-p, p)
    return torch.where(d < 0, d + p, d)


def to_field(x_int: Tensor, p: int) -> Tensor:
    """Map signed int64 integers to their residues in ``[0, p)``.

    Args:
        x_int: Integer tensor (any signed values).
        p: The modulus.

    Returns:
        int64 tensor in ``[0, p)``, same device.
    """
    return torch.remainder(x_int.to(torch.int64), p)


def from_field(y: Tensor, p: int) -> Tensor:
    """Centered lift: residues in ``[0, p)`` to signed integers in ``[-(p-1)/2, (p-1)/2]``.

    This is the inverse of :func:`to_field` on integers with ``|z| <= (p - 1) // 2``.

    Args:
        y: int64 tensor in ``[0, p)``.
        p: The (odd) modulus.

    Returns:
        int64 tensor with values in ``[-(p-1)//2, (p-1)//2]``.
    """
    return torch.where(y > (p - 1) // 2, y - p, y)


def check_field_range(x: Tensor, p: int, what: str = "tensor") -> None:
    """Raise unless ``x`` is an int64 tensor with every value in ``[0, p)``.

    Args:
        x: The tensor to check.
        p: The modulus.
        what: Name used in the error message.

    Raises:
        EncodingError: Wrong dtype or a value outside ``[0, p)``.
    """
    if x.dtype != torch.int64:
        raise EncodingError(f"{what} must be int64 field elements, got {x.dtype}")
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x)
    if int(lo) < 0 or int(hi) >= p:
        raise EncodingError(
            f"{what} has values outside [0, p) for p={p} (min {int(lo)}, max {int(hi)})"
        )


def _count_nonfinite(x: Tensor) -> int:
    return int((~torch.isfinite(x)).sum())


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A frozen weight matrix as fixed-point integers with per-output-channel scales.

    ``W ≈ scale[:, None] * w_int``. The L1 bounds are exact Python ints.

    Attributes:
        w_int: int64 ``(out, in)``, ``|w_int| <= 2**(w_bits-1) - 1``.
        scale: float64 ``(out,)`` per-output-channel scale.
        w_bits: Bit width of the signed encoding.
        row_l1: ``max_i sum_j |w_int[i, j]|``; bounds every entry of ``x_int @ w_intᵀ``.
        col_l1: ``max_j sum_i |w_int[i, j]|``; bounds every entry of ``g_int @ w_int``.
    """

    w_int: Tensor
    scale: Tensor
    w_bits: int
    row_l1: int
    col_l1: int

    @property
    def out_features(self) -> int:
        """Number of output channels (rows of ``w_int``)."""
        return int(self.w_int.shape[0])

    @property
    def in_features(self) -> int:
        """Number of input channels (columns of ``w_int``)."""
        return int(self.w_int.shape[1])


def quantize_weight(w: Tensor, w_bits: int) -> QuantizedWeight:
    """Symmetric per-output-channel round-to-nearest quantization of a frozen weight.

    Computed in float64 on ``w``'s device. Rows of zeros get scale 1 (and stay zero).

    Args:
        w: Floating tensor ``(out, in)``.
        w_bits: Signed bit width in ``[2, 16]``; ``|w_int| <= 2**(w_bits-1) - 1``.

    Returns:
        The :class:`QuantizedWeight`.

    Raises:
        EncodingError: ``w_bits`` out of range, ``w`` not 2-D floating, or non-finite entries.
    """
    if not isinstance(w_bits, int) or isinstance(w_bits, bool) or not 2 <= w_bits <= 16:
        raise EncodingError(f"w_bits must be an int in [2, 16], got {w_bits!r}")
    if w.ndim != 2 or not w.is_floating_point():
        raise EncodingError(f"weight must be a 2-D floating tensor, got {w.dtype} {tuple(w.shape)}")
    w64 = w.detach().to(torch.float64)
    bad = _count_nonfinite(w64)
    if bad:
        raise EncodingError(f"weight has {bad} non-finite entries; cannot quantize")
    qmax = (1 << (w_bits - 1)) - 1
    out, inp = w64.shape
    if inp == 0:
        rowmax = torch.zeros(out, dtype=torch.float64, device=w64.device)
    else:
        rowmax = w64.abs().amax(dim=1)  # (out,)
    scale = torch.where(rowmax > 0, rowmax / qmax, torch.ones_like(rowmax))  # (out,)
    safe = torch.where(rowmax > 0, rowmax, torch.ones_like(rowmax))
    w_int = torch.round(w64 / safe[:, None] * qmax).to(torch.int64).clamp_(-qmax, qmax)
    absw = w_int.abs()
    row_l1 = int(absw.sum(dim=1).max()) if absw.numel() else 0
    col_l1 = int(absw.sum(dim=0).max()) if absw.numel() else 0
    return QuantizedWeight(w_int=w_int, scale=scale, w_bits=w_bits, row_l1=row_l1, col_l1=col_l1)


def input_bits(field: Field, l1: int) -> int:
    """Largest magnitude bit width for inputs such that the integer product stays exact.

    Returns the largest ``b >= 1`` with ``(2**b - 1) * l1 <= (p - 1) // 2``: an input row with
    ``|x_int| <= 2**b - 1`` times a weight whose L1 bound is ``l1`` gives results ``z`` with
    ``|z| <= (p - 1) // 2``, recovered exactly by :func:`from_field`. An ``l1`` of 0 (all-zero
    weight) is treated as 1.

    Args:
        field: The field.
        l1: ``row_l1`` (forward) or ``col_l1`` (backward) of the quantized weight.

    Returns:
        The bit width ``b``.

    Raises:
        EncodingError: Not even ``b = 1`` fits (the message names ``p`` and ``l1``).
        ValueError: ``l1`` is negative.
    """
    if l1 < 0:
        raise ValueError(f"l1 must be non-negative, got {l1}")
    half = (field.p - 1) // 2
    l1e = max(int(l1), 1)
    b = (half // l1e + 1).bit_length() - 1  # largest b with 2**b - 1 <= half // l1
    if b < 1:
        raise EncodingError(
            f"field p={field.p} is too small for weight L1 bound l1={l1}: "
            f"need (2**b - 1) * l1 <= (p - 1) // 2 = {half} for some b >= 1"
        )
    return b


def encode_rows(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-row dynamic fixed-point encoding of activations or gradients.

    ``s = rowmax|x| / (2**bits - 1)`` (rows of zeros get ``s = 1``); ``x_int = round(x / s)``,
    so ``|x_int| <= 2**bits - 1`` and ``|x - s * x_int| <= s / 2`` (up to float64 rounding).
    Computed in float64 on ``x``'s device. Rows run along the last dimension. (A row whose
    maximum is below ``(2**bits - 1) * 2**-1022`` gets a subnormal scale and loses relative
    precision; such rows are numerically zero for training.)

    Args:
        x: Floating tensor ``(n, d)`` (any leading dims are accepted; rows are the last dim).
        bits: Magnitude bit width in ``[1, 62]``, usually from :func:`input_bits`.

    Returns:
        ``(x_int, scale)``: int64 ``(n, d)`` and float64 ``(n, 1)``.

    Raises:
        EncodingError: Non-finite entries (the message says how many), ``bits`` out of range,
            or a non-floating / 0-D input.
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 62:
        raise EncodingError(f"encoding bits must be an int in [1, 62], got {bits!r}")
    if x.ndim < 1 or not x.is_floating_point():
        raise EncodingError(f"encode_rows wants a floating tensor with rows, got {x.dtype}")
    x64 = x.detach().to(torch.float64)
    bad = _count_nonfinite(x64)
    if bad:
        raise EncodingError(f"{bad} non-finite entries in the input; refusing to encode")
    qmax = (1 << bits) - 1
    if x64.shape[-1] == 0:
        rowmax = torch.zeros((*x64.shape[:-1], 1), dtype=torch.float64, device=x64.device)
    else:
        rowmax = x64.abs().amax(dim=-1, keepdim=True)  # (n, 1)
    nonzero = rowmax > 0
    safe = torch.where(nonzero, rowmax, torch.ones_like(rowmax))
    scale = torch.where(nonzero, rowmax / float(qmax), torch.ones_like(rowmax))  # (n, 1)
    # x / rowmax is in [-1, 1]: no under/overflow whatever the magnitude of the row.
    x_int = torch.round(x64 / safe * float(qmax)).to(torch.int64).clamp_(-qmax, qmax)
    return x_int, scale


def decode_rows(y_int: Tensor, row_scale: Tensor, col_scale: Tensor | None) -> Tensor:
    """``y_int * row_scale * col_scale[None, :]`` in float64.

    Args:
        y_int: Integer tensor ``(n, m)`` (e.g. the centered product from :func:`from_field`).
        row_scale: float64 ``(n, 1)`` from :func:`encode_rows`.
        col_scale: float64 ``(m,)`` (e.g. ``QuantizedWeight.scale`` in the forward) or None.

    Returns:
        float64 ``(n, m)``.
    """
    y = y_int.to(torch.float64) * row_scale.to(torch.float64)
    if col_scale is not None:
        y = y * col_scale.to(torch.float64)[None, :]
    return y


def check_range(x_int: Tensor, bits: int) -> None:
    """Refuse integers outside ``[-(2**bits - 1), 2**bits - 1]`` (never a silent wrap).

    Args:
        x_int: Integer tensor.
        bits: Magnitude bit width.

    Raises:
        EncodingError: Some entry is out of range (the message says how many and the worst).
    """
    qmax = (1 << bits) - 1
    bad = (x_int > qmax) | (x_int < -qmax)
    n_bad = int(bad.sum())
    if n_bad:
        vals = x_int[bad]
        worst = max(-int(vals.min()), int(vals.max()))
        raise EncodingError(
            f"{n_bad} entries exceed the {bits}-bit range ±{qmax} (largest |x| = {worst})"
        )
