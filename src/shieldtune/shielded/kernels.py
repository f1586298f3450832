"""The hot path's elementwise chains, each fused into one pass: encode + mask, unmask + decode.

Around every masked product the enclave runs two chains of elementwise steps over (n, d)
tensors (per row of the operand)::

    encode + mask:    x64 = x · pre                       (pre: σ in the backward, else 1)
                      s   = rowmax|x64| / qmax             (rows of zeros: s = 1)
                      x̃   = round(x64 / rowmax · qmax) + R  (mod p)
    unmask + decode:  y   = centre(ỹ − U  (mod p)) · s · σ

Run eagerly, each step is its own pass over a fresh int64 tensor; on a 2-core CPU that cost
more than the GEMM itself (minilm, 2048 × 1536: about 66 ms eager against 2 ms fused, beside a
44 ms float32 GEMM). ``torch.compile`` (Inductor) fuses each chain into one loop. The fused and
the eager functions are the same arithmetic, step for step (tests compare them bit for bit);
where Inductor cannot compile (no C++ compiler), :class:`Kernels` warns and runs eagerly.

The generated kernels are built at run time from this file's source and the installed torch
(Inductor's cache keys on both); in a hardware enclave that JIT step would have to move to
build time. In the simulated enclave it runs in the enclave process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch
from torch import Tensor

from shieldtune.errors import EncodingError

__all__ = ["Kernels", "encode_mask", "unmask_decode"]

log = logging.getLogger("shieldtune.shielded")


def encode_mask(
    x: Tensor, pre: Tensor | None, mask: Tensor, qmax: Tensor, p: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Encode rows of ``x`` (times ``pre`` per column) in fixed point and add the mask mod p.

    Args:
        x: Floating (n, d).
        pre: float64 (d,) column factors applied first (None: none).
        mask: int64 (n, d), uniform in [0, p).
        qmax: float64 0-d tensor ``2**bits - 1``.
        p: The prime.

    Returns:
        ``(sent, scale, bad)``: int64 (n, d) in [0, p); float64 (n, 1) row scales; int64 0-d
        count of non-finite entries of ``x64`` (the caller refuses the operand when > 0).
    """
    x64 = x.to(torch.float64)  # (n, d)
    if pre is not None:
        x64 = x64 * pre
    bad = (~torch.isfinite(x64)).sum()
    rowmax = x64.abs().amax(dim=-1, keepdim=True)  # (n, 1)
    nonzero = rowmax > 0
    one = torch.ones_like(rowmax)
    safe = torch.where(nonzero, rowmax, one)
    scale = torch.where(nonzero, rowmax / qmax, one)  # (n, 1)
    q = qmax.to(torch.int64)
    x_int = torch.round(x64 / safe * qmax).to(torch.int64).clamp(-q, q)  # |x_int| <= qmax
    sent = x_int + mask  # (n, d) in (-p, 2p)
    sent = sent + p * (sent < 0).to(torch.int64)
    sent = sent - p * (sent >= p).to(torch.int64)  # [0, p)
    return sent, scale, bad


def unmask_decode(
    got: Tensor, factor: Tensor, row_scale: Tensor, col_scale: Tensor | None, p: int
) -> Tensor:
    """``centre(got − factor mod p) · row_scale · col_scale``: the exact product, as float64.

    Args:
        got: int64 (n, m) in [0, p): the accelerator's masked product.
        factor: int64 (n, m) in [0, p): the unmasking factor.
        row_scale: float64 (n, 1) from :func:`encode_mask`.
        col_scale: float64 (m,) (the weight's per-channel scale in the forward) or None.
        p: The prime.
    """
    d = got - factor  # (n, m) in (-p, p)
    d = torch.where(d < 0, d + p, d)  # [0, p)
    d = torch.where(d > (p - 1) // 2, d - p, d)  # centred: the signed integer product
    y = d.to(torch.float64) * row_scale
    if col_scale is not None:
        y = y * col_scale
    return y


class Kernels:
    """:func:`encode_mask` and :func:`unmask_decode`, fused by ``torch.compile`` or eager.

    Args:
        fused: Compile them (on first use; once per process and shape family). A failure to
            compile is logged once and the eager functions are used from then on.
    """

    _lock = threading.Lock()

    def __init__(self, fused: bool = True) -> None:
        self.fused = fused
        self._encode: Callable[..., tuple[Tensor, Tensor, Tensor]] = encode_mask
        self._decode: Callable[..., Tensor] = unmask_decode
        self._compiled = False

    def _compile(self) -> None:
        with self._lock:
            if self._compiled or not self.fused:
                return
            self._compiled = True
            try:
                import torch._inductor.config as inductor_config

                inductor_config.compile_threads = 1  # no pool of compile workers
                enc = torch.compile(encode_mask, dynamic=True)
                dec = torch.compile(unmask_decode, dynamic=True)
                probe = torch.zeros(2, 3)
                zeros = torch.zeros(2, 3, dtype=torch.int64)
                qmax = torch.tensor(7.0, dtype=torch.float64)
                enc(probe, None, zeros, qmax, 11)
                enc(probe, torch.ones(3, dtype=torch.float64), zeros, qmax, 11)
                scale = torch.ones(2, 1, dtype=torch.float64)
                dec(zeros, zeros, scale, torch.ones(3, dtype=torch.float64), 11)
                dec(zeros, zeros, scale, None, 11)
            except Exception as err:  # noqa: BLE001  (any compiler failure: run eagerly)
                log.warning("fused kernels unavailable (%s); running them eagerly", err)
                self.fused = False
                return
            self._encode, self._decode = enc, dec

    def encode_mask(
        self, x: Tensor, pre: Tensor | None, mask: Tensor, bits: int, p: int
    ) -> tuple[Tensor, Tensor]:
        """``(sent, row_scale)``; see :func:`encode_mask`.

        Raises:
            EncodingError: Non-finite entries in the operand (nothing is sent).
        """
        if not self._compiled:
            self._compile()
        qmax = torch.tensor(float((1 << bits) - 1), dtype=torch.float64)
        sent, scale, bad = self._encode(x.detach(), pre, mask, qmax, p)
        if int(bad):
            raise EncodingError(f"{int(bad)} non-finite entries in the input; refusing to encode")
        return sent, scale

    def unmask_decode(
        self, got: Tensor, factor: Tensor, row_scale: Tensor, col_scale: Tensor | None, p: int
    ) -> Tensor:
        """The exact product as float64; see :func:`unmask_decode`."""
        if not self._compiled:
            self._compile()
        return self._decode(got, factor, row_scale, col_scale, p)
