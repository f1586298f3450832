"""One-time uniform masks over F_p derived from a PRF keyed inside the TEE.

Every mask ``R_c`` is addressed by a counter ``c = (step, micro_batch, layer, op, direction)``::

    subkey_c = HMAC-SHA256(key, "shieldtune/method1/mask/v1" ‖ p ‖ c ‖ shape)   (fixed-width fields)
    stream_c = ChaCha20(subkey_c, nonce = 0¹⁶) keystream
    R_c      = numel little-endian words of stream_c, low p.bit_length() bits kept; each draw >= p
               is rejected and refilled by the next accepted draws   (rejection sampling: exactly
               uniform; see uniform_from_bytes)

Rejection sampling (never ``mod p`` of a wider draw, which is biased) makes each entry exactly
uniform on ``[0, p)`` given a random key; entries are independent, so a mask is full rank over
F_p except with probability below ``n / p**(d - n + 1)`` for an ``n x d`` mask (``n <= d``) and two
rows coincide with probability below ``n**2 / p**d``. Nothing is checked at run time: these
failure probabilities are negligible for the fields Method 1 uses.

One-time use is enforced: :meth:`MaskPRF.mask` accepts a counter only if ``(step, micro_batch)``
is strictly greater (lexicographically) than the last one issued for the same
``(layer, op, direction)`` stream; anything else raises :class:`~shieldtune.errors.MaskReuseError`.
:meth:`MaskPRF.peek` recomputes a mask without consuming it (tests only; the unmasking-factor
pool calls :meth:`MaskPRF.mask` exactly once per counter and keeps the result).

Masks are generated on the CPU (inside the enclave) and then moved to the requested device.
The keystream is read in the host byte order; every platform shieldtune supports is
little-endian.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Sequence

import torch
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from torch import Tensor

from shieldtune.errors import MaskReuseError
from shieldtune.shielded.field import Field

__all__ = ["Counter", "COUNTER_FIELDS", "MaskPRF", "uniform_from_bytes"]

Counter = tuple[int, int, int, int, int]
"""``(step, micro_batch, layer, op, direction)``; each field in ``[0, 2**32)``."""

COUNTER_FIELDS = ("step", "micro_batch", "layer", "op", "direction")

_DOMAIN = b"shieldtune/method1/mask/v1\x00"
_MAX_NDIM = 32


def uniform_from_bytes(
    next_bytes: Callable[[int], bytes | bytearray], p: int, numel: int
) -> Tensor:
    """Exactly uniform draws on ``[0, p)`` by rejection sampling from a byte source.

    Reads ``numel`` little-endian words (4 bytes when ``p < 2**31``, else 8) and keeps the low
    ``p.bit_length()`` bits. Every draw ``>= p`` is rejected and its position refilled, in
    order, by the next accepted draws of the same stream (recursively; acceptance rate
    ``> 1/2``). Each output entry is therefore an accepted draw: exactly uniform and independent,
    never ``mod p`` of a wider draw. The result depends only on the byte stream.

    Args:
        next_bytes: Returns the next ``k`` bytes of a random stream when called with ``k``.
        p: Exclusive upper bound, ``2 <= p < 2**62``.
        numel: Number of values wanted.

    Returns:
        int64 CPU tensor ``(numel,)`` with values in ``[0, p)``.
    """
    if numel == 0:
        return torch.empty(0, dtype=torch.int64)
    bits = p.bit_length()
    word, dtype = (4, torch.int32) if bits <= 31 else (8, torch.int64)
    raw = next_bytes(numel * word)
    if not isinstance(raw, bytearray):  # frombuffer wants a writable buffer
        raw = bytearray(raw)
    v = torch.frombuffer(raw, dtype=dtype).bitwise_and_((1 << bits) - 1)  # (numel,) < 2**bits
    rejected = (v >= p).nonzero().squeeze(1)  # ascending positions; few when p ~ 2**bits
    if rejected.numel():
        v[rejected] = uniform_from_bytes(next_bytes, p, rejected.numel()).to(dtype)
    return v.to(torch.int64)


def _check_counter(counter: Sequence[int]) -> Counter:
    if len(counter) != 5:
        raise ValueError(f"a mask counter has 5 fields {COUNTER_FIELDS}, got {counter!r}")
    out = []
    for name, v in zip(COUNTER_FIELDS, counter, strict=True):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < (1 << 32):
            raise ValueError(f"mask counter field {name}={v!r} must be an int in [0, 2**32)")
        out.append(int(v))
    return tuple(out)  # type: ignore[return-value]


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) > _MAX_NDIM or any(s < 0 for s in shape):
        raise ValueError(f"bad mask shape {shape}")
    return shape


class MaskPRF:
    """Derives one-time uniform masks over F_p from a secret 32-byte key.

    Args:
        key: 32 secret bytes (the enclave draws them with ``os.urandom(32)``).
        field: The field the masks live in.

    Raises:
        ValueError: ``key`` is not 32 bytes.
    """

    def __init__(self, key: bytes, field: Field) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
            raise ValueError("MaskPRF key must be exactly 32 bytes")
        self._key = bytes(key)
        self.field = field
        self._last: dict[tuple[int, int, int], tuple[int, int]] = {}
        self._used = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never show the key
        return f"MaskPRF(p={self.field.p}, used={self._used})"

    @property
    def used(self) -> int:
        """Number of masks issued by :meth:`mask` so far."""
        return self._used

    def mask(self, counter: Counter, shape: tuple[int, ...], device=None) -> Tensor:
        """Issue the one-time mask for ``counter``; the counter is consumed.

        Args:
            counter: ``(step, micro_batch, layer, op, direction)``. ``(step, micro_batch)`` must
                be strictly greater than the last one issued for the same
                ``(layer, op, direction)`` stream.
            shape: Shape of the mask.
            device: Where to put it (generated on CPU, then moved).

        Returns:
            int64 tensor of ``shape``, uniform on ``[0, p)``.

        Raises:
            MaskReuseError: The counter was used before, or is not after the stream's last one.
            ValueError: Malformed counter or shape.
        """
        c = _check_counter(counter)
        shp = _check_shape(shape)
        stream, pos = (c[2], c[3], c[4]), (c[0], c[1])
        with self._lock:
            last = self._last.get(stream)
            if last is not None and pos <= last:
                named = dict(zip(COUNTER_FIELDS, c, strict=True))
                if pos == last:
                    raise MaskReuseError(f"mask counter {named} was already used")
                raise MaskReuseError(
                    f"mask counter {named} is not after the last one used for stream "
                    f"(layer, op, direction)={stream}: (step, micro_batch)={last}"
                )
            self._last[stream] = pos
            self._used += 1
        return self._generate(c, shp, device)

    def peek(self, counter: Counter, shape: tuple[int, ...], device=None) -> Tensor:
        """The same values :meth:`mask` gives for ``(counter, shape)``, without consuming.

        For tests only; the unmasking-factor pool calls :meth:`mask` exactly once per counter.

        Args:
            counter: The counter.
            shape: Shape of the mask.
            device: Where to put it.

        Returns:
            int64 tensor of ``shape``, uniform on ``[0, p)``.
        """
        return self._generate(_check_counter(counter), _check_shape(shape), device)

    def _subkey(self, c: Counter, shape: tuple[int, ...]) -> bytes:
        msg = (
            _DOMAIN
            + struct.pack("<Q", self.field.p)
            + struct.pack("<5I", *c)
            + struct.pack("<B", len(shape))
            + struct.pack(f"<{len(shape)}Q", *shape)
        )
        h = hmac.HMAC(self._key, hashes.SHA256())
        h.update(msg)
        return h.finalize()

    def _generate(self, c: Counter, shape: tuple[int, ...], device) -> Tensor:
        numel = 1
        for s in shape:
            numel *= s
        enc = Cipher(algorithms.ChaCha20(self._subkey(c, shape), b"\x00" * 16), mode=None)
        stream = enc.encryptor()

        def next_bytes(k: int) -> bytearray:
            out = bytearray(k)
            stream.update_into(bytes(k), out)  # keystream = ChaCha20(0^k)
            return out

        vals = uniform_from_bytes(next_bytes, self.field.p, numel).reshape(shape)
        return vals if device is None else vals.to(device)
