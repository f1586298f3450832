"""Enclave side of the exact masked offload (DESIGN.md §2, Method 1): the hot path.

For frozen map i with per-output-channel integer weights W_int (W ≈ diag σ · W_int) over F_p:

    forward, secret x (n, in):
        x_int, s = encode_rows(x)                 # (n, in) int,  (n, 1) per-row scale
        x̃ = x_int + R_c  (mod p)                  # R_c uniform, used once
        ỹ = accelerator(x̃)  = x̃ · W_intᵀ (mod p)   # untrusted; Freivalds-checked
        y_int = centre(ỹ − U_c)                   # U_c = R_c · W_intᵀ, made ahead (pool)
        y = s · y_int · σ                         # (n, out), exact fixed point → float

    backward, secret ∂y (n, out):  h = ∂y · diag σ;  the same with S_c, V_c = S_c · W_int and
        the accelerator computing h̃ · W_int;  ∂x = s' · centre(...)

The encoding and the mask addition are one fused pass, and so are the unmasking and the
decoding (:mod:`~shieldtune.shielded.kernels`). :class:`ClearFixedPoint` does the same encoding
and integer products in the clear (no mask, no accelerator): the masked path must equal it bit
for bit.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from shieldtune.errors import IntegrityError
from shieldtune.shielded.field import Field, QuantizedWeight, input_bits
from shieldtune.shielded.kernels import Kernels
from shieldtune.shielded.pool import BACKWARD, FORWARD, Factor, FactorPool

__all__ = ["LayerPlan", "plan_layers", "OffloadStats", "ClearFixedPoint", "MaskedOffload"]


@dataclass
class LayerPlan:
    """Encoding of one frozen map.

    Attributes:
        qw: The quantised weight (int weights, per-channel scales, bounds).
        fwd_bits: Bits of the encoded input (``(2^b − 1) · row_l1 <= (p − 1)/2``).
        bwd_bits: Bits of the encoded output gradient (bounded by ``col_l1``).
    """

    qw: QuantizedWeight
    fwd_bits: int
    bwd_bits: int

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in)."""
        return tuple(self.qw.w_int.shape)  # type: ignore[return-value]


def plan_layers(
    field: Field, qws: Sequence[QuantizedWeight], max_bits: int | None
) -> list[LayerPlan]:
    """Per map, the most input bits the field allows without a wrap (capped at ``max_bits``).

    Raises:
        EncodingError: The field is too small for a map's weights.
    """
    plans = []
    for qw in qws:
        fwd, bwd = input_bits(field, qw.row_l1), input_bits(field, qw.col_l1)
        if max_bits is not None:
            fwd, bwd = min(fwd, max_bits), min(bwd, max_bits)
        plans.append(LayerPlan(qw, fwd, bwd))
    return plans


@dataclass
class OffloadStats:
    """Time split and traffic of the offloaded products (seconds, bytes)."""

    encode: float = 0.0  # fixed-point encoding fused with adding the mask
    mask: float = 0.0  # taking a factor from the pool (made online on a miss)
    transfer: float = 0.0  # shared memory + control round trip, minus the worker's compute
    worker: float = 0.0  # the worker's products (as it reports)
    check: float = 0.0  # Freivalds
    unmask: float = 0.0  # removing the factor fused with decoding
    products: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    checks_failed: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """Flat figures (for logs and benchmark tables)."""
        out = {k: v for k, v in vars(self).items() if k != "extra"}
        return {**out, **self.extra}


class ClearFixedPoint:
    """The same fixed-point computation as :class:`MaskedOffload`, in the clear (reference).

    The same kernels with a zero mask and a zero factor: encoding, the integer product mod p,
    centring and decoding, with no accelerator in between.

    Args:
        field: The field (products are reduced and centred exactly as in the masked path).
        plans: Encoding per map.
        gemm: An exact backend; prepared weights on the CPU.
        kernels: The elementwise kernels (default: fused where possible).
    """

    def __init__(
        self,
        field: Field,
        plans: Sequence[LayerPlan],
        gemm,  # noqa: ANN001
        kernels: Kernels | None = None,
    ) -> None:
        self.field, self.plans, self.gemm = field, list(plans), gemm
        self.kernels = kernels or Kernels()
        self.prepared = [gemm.prepare(pl.qw, field, torch.device("cpu")) for pl in self.plans]

    def _product(self, layer: int, op: torch.Tensor, direction: int) -> torch.Tensor:
        plan, pw, p, k = self.plans[layer], self.prepared[layer], self.field.p, self.kernels
        pre, bits, post = _encoding(plan, direction)
        zeros = torch.zeros(op.shape, dtype=torch.int64)
        sent, s = k.encode_mask(op, pre, zeros, bits, p)  # (n, d) = to_field(op_int)
        y = self.gemm.forward(pw, sent) if direction == FORWARD else self.gemm.backward(pw, sent)
        return k.unmask_decode(y, torch.zeros_like(y), s, post, p)  # (n, d_ret) float64

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self._product(layer, x, FORWARD)  # (n, out)

    def backward(self, layer: int, g: torch.Tensor) -> torch.Tensor:
        return self._product(layer, g, BACKWARD)  # (n, in)


def _encoding(
    plan: LayerPlan, direction: int
) -> tuple[torch.Tensor | None, int, torch.Tensor | None]:
    """``(pre, bits, post)``: forward x·Wᵀ encodes x and decodes with σ; backward ∂y·W encodes
    ∂y·diag σ (σ folded in first) and decodes with the row scale only."""
    if direction == FORWARD:
        return None, plan.fwd_bits, plan.qw.scale
    return plan.qw.scale, plan.bwd_bits, None


class MaskedOffload:
    """Frozen products on the untrusted accelerator, on one-time-padded operands.

    Args:
        field: The field F_p.
        plans: Encoding per map (index = layer id).
        pool: Masks and unmasking factors (:class:`FactorPool`).
        link: The accelerator (``product(layer, sent, backward) -> untrusted copy``).
        checks: Freivalds check per map (``check_forward(x, y)`` / ``check_backward(g, y)``).
        check_rate: Share of products checked (1.0: all).
        rng: Decides which products are checked (secret to the enclave).
        kernels: The elementwise kernels (default: fused where possible).
    """

    def __init__(
        self,
        field: Field,
        plans: Sequence[LayerPlan],
        pool: FactorPool,
        link,  # noqa: ANN001
        checks: Sequence,
        check_rate: float = 1.0,
        rng: torch.Generator | None = None,
        kernels: Kernels | None = None,
    ) -> None:
        self.field, self.plans, self.pool, self.link = field, list(plans), pool, link
        self.checks, self.check_rate = list(checks), check_rate
        self.kernels = kernels or Kernels()
        self.rng = rng or torch.Generator().manual_seed(secrets.randbits(63))
        self.stats = OffloadStats()

    # ------------------------------------------------------------------ the hot path
    def _masked_product(self, layer: int, op: torch.Tensor, direction: int) -> torch.Tensor:
        """The exact fixed-point product of the secret ``op`` (n, d_sent), as float64:
        decode(centre(accelerator(encode(op) + mask) − factor))."""
        p, st, k = self.field.p, self.stats, self.kernels
        pre, bits, post = _encoding(self.plans[layer], direction)
        rows = self.pool.rows
        parts = []
        for start in range(0, op.shape[0], rows):  # a use never exceeds the pool's rows
            chunk = op[start : start + rows]  # (n, d_sent) float, secret
            t0 = time.perf_counter()
            fac: Factor = self.pool.take(layer, direction, chunk.shape[0])
            t1 = time.perf_counter()
            sent, s = k.encode_mask(chunk, pre, fac.mask, bits, p)  # (n, d_sent) uniform in [0, p)
            t2 = time.perf_counter()
            worker0 = self.link.seconds_worker
            got = self.link.product(layer, sent, direction == BACKWARD)  # (n, d_ret) untrusted
            t3 = time.perf_counter()
            if self._should_check():
                check = self.checks[layer]
                ok = (check.check_backward if direction == BACKWARD else check.check_forward)(
                    sent, got
                )
                if not ok:
                    st.checks_failed += 1
                    raise IntegrityError(
                        f"Freivalds check failed on map {layer} "
                        f"({'backward' if direction == BACKWARD else 'forward'}): the "
                        "accelerator returned a wrong product; the step is aborted"
                    )
            t4 = time.perf_counter()
            parts.append(k.unmask_decode(got, fac.factor, s, post, p))  # (n, d_ret) float64
            t5 = time.perf_counter()
            worker = self.link.seconds_worker - worker0
            st.mask += t1 - t0
            st.encode += t2 - t1
            st.worker += worker
            st.transfer += (t3 - t2) - worker
            st.check += t4 - t3
            st.unmask += t5 - t4
            st.products += 1
            st.bytes_sent += sent.numel() * sent.element_size()
            st.bytes_received += got.numel() * got.element_size()
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _should_check(self) -> bool:
        if self.check_rate >= 1.0:
            return True
        return bool(torch.rand((), generator=self.rng) < self.check_rate)

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """y ≈ x · Wᵀ for secret x (n, in): exact in fixed point; (n, out) float64."""
        return self._masked_product(layer, x, FORWARD)

    def backward(self, layer: int, g: torch.Tensor) -> torch.Tensor:
        """∂x ≈ ∂y · W for secret ∂y (n, out): (n, in) float64."""
        return self._masked_product(layer, g, BACKWARD)


def default_field_bits(
    qws: Sequence[QuantizedWeight], headroom_bits: int = 53, min_operand_bits: int = 8
) -> int:
    """Bits of the prime: the largest for which one float64 GEMM stays exact on these weights,
    unless that leaves some map fewer than ``min_operand_bits`` bits for its operands; then the
    smallest that gives every map that many (its products need limbs: slower, still exact).

    Every partial sum of ``x̃ · W_int`` is below ``p · l1``; one GEMM needs it below ``2^53``.
    A map with L1 bound ``l1`` gets ``b`` operand bits when ``(2^b − 1) · l1 <= (p − 1) / 2``.
    (SmolLM2's tied LM head, 49,152 wide, has ``l1 ≈ 2^27`` with 12-bit weights: one GEMM
    would leave its gradient no bit at all.)
    """
    l1_bits = math.ceil(math.log2(max(max(qw.row_l1, qw.col_l1) for qw in qws) + 1))
    single = headroom_bits - l1_bits
    needed = l1_bits + 1 + min_operand_bits
    return single if single >= needed else min(needed, 61)
