"""The split protocol: ECALL names, what each request carries, wire dtypes, request checks.

Transport-agnostic. Every request is one frame (metadata + named tensors) inside the attested
channel that ends in the server enclave; the host relays only its ciphertext.

    ECALL           client -> enclave                               enclave -> client
    init            -                                               {trainable_params, steps, ...}
    train_step      hidden (B,T,d) wire, attention_mask (B,T) i64,  grad (B,T,d) wire,
                    labels (B,) or (B,T) i64                        {loss, token}
    commit          -                                               {steps}
    grad_only       as train_step (eval mode, no update)            grad (B,T,d) wire, {loss}
    eval_step       hidden (B,T,d) wire, attention_mask (B,T) i64   logits (B,C) or (B,T,V)
    export_adapter  -                                               the adapter's tensors
    checkpoint      -                                               {tensors} (state to seal)

A training step is a two-phase transaction: ``train_step`` computes the loss and every
gradient but only *stages* the server-side update under a fresh random ``token``; the client
commits it (``meta["commit"] = token``) with its next request, once it has applied its own
half. A client that disconnects mid-step never commits, so the server adapter stays as it was.
Any request may carry ``commit``; it is applied only after the whole request was checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from shieldtune.crypto.framing import Frame
from shieldtune.errors import ChannelError

__all__ = [
    "PROGRAM_NAME",
    "ECALLS",
    "WIRE_DTYPES",
    "COMMIT_KEY",
    "BatchSpec",
    "wire_dtype_of",
    "to_wire",
    "check_batch",
    "check_meta",
]

PROGRAM_NAME = "split-server"
ECALLS = (
    "init",
    "train_step",
    "commit",
    "grad_only",
    "eval_step",
    "export_adapter",
    "checkpoint",
)
WIRE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COMMIT_KEY = "commit"
_TOKEN_HEX = 32  # 16 random bytes


def wire_dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a wire dtype name.

    Raises:
        ChannelError: Unknown name (lists the accepted ones).
    """
    if name not in WIRE_DTYPES:
        raise ChannelError(f"wire dtype {name!r} unknown; accepted: {', '.join(WIRE_DTYPES)}")
    return WIRE_DTYPES[name]


def to_wire(t: torch.Tensor, wire_dtype: str) -> torch.Tensor:
    """Detached, contiguous copy of ``t`` in the wire dtype (float32 stays bit-exact)."""
    return t.detach().to(wire_dtype_of(wire_dtype)).contiguous()


@dataclass(frozen=True)
class BatchSpec:
    """What the server accepts: the geometry of its back slice.

    Attributes:
        task: ``seq-cls`` or ``causal-lm``.
        hidden_size: d of the cut-layer hidden states.
        num_labels: Classes (seq-cls), else None.
        vocab_size: Token ids labels may hold (causal-lm).
        wire_dtype: Name of the dtype hidden states travel in.
        max_tokens: Most B·T per request.
    """

    task: str
    hidden_size: int
    num_labels: int | None
    vocab_size: int
    wire_dtype: str
    max_tokens: int


def _refuse(ecall: str, what: str) -> ChannelError:
    return ChannelError(f"malformed {ecall!r} request refused: {what}")


def check_meta(ecall: str, meta: Mapping[str, object]) -> str | None:
    """Check a request's metadata; return the commit token it carries, if any.

    Raises:
        ChannelError: An unknown key or a malformed token.
    """
    extra = sorted(set(meta) - {COMMIT_KEY})
    if extra:
        raise _refuse(ecall, f"unknown metadata {extra}; accepted: {COMMIT_KEY}")
    token = meta.get(COMMIT_KEY)
    if token is None:
        return None
    if not isinstance(token, str) or len(token) != _TOKEN_HEX:
        raise _refuse(ecall, f"{COMMIT_KEY} must be a {_TOKEN_HEX}-character step token")
    return token


def _tensor(frame: Frame, name: str, ecall: str) -> torch.Tensor:
    t = frame.tensors.get(name)
    if t is None:
        raise _refuse(ecall, f"tensor {name!r} is missing")
    return t


def check_batch(
    frame: Frame, spec: BatchSpec, ecall: str, *, labels: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check a batch request completely before anything uses it.

    Args:
        frame: The decoded request.
        spec: The server's geometry.
        ecall: The ECALL name (for messages).
        labels: Whether labels are required (train_step, grad_only) or refused (eval_step).

    Returns:
        ``(hidden (B,T,d), attention_mask (B,T), labels (B,) / (B,T) or None)``.

    Raises:
        ChannelError: Naming the tensor, what it is and what is accepted.
    """
    names = {"hidden", "attention_mask", *(["labels"] if labels else [])}
    extra = sorted(set(frame.tensors) - names)
    if extra:
        raise _refuse(ecall, f"unexpected tensors {extra}; accepted: {sorted(names)}")
    hidden = _tensor(frame, "hidden", ecall)  # (B, T, d)
    mask = _tensor(frame, "attention_mask", ecall)  # (B, T)
    want = wire_dtype_of(spec.wire_dtype)
    if hidden.dtype != want or hidden.dim() != 3 or hidden.shape[2] != spec.hidden_size:
        raise _refuse(
            ecall,
            f"hidden is {str(hidden.dtype).removeprefix('torch.')} {list(hidden.shape)}; "
            f"accepted: {spec.wire_dtype} (B, T, {spec.hidden_size})",
        )
    b, t = hidden.shape[0], hidden.shape[1]
    if b < 1 or t < 1 or b * t > spec.max_tokens:
        raise _refuse(ecall, f"batch {b}×{t} is empty or above max_tokens={spec.max_tokens}")
    if not bool(torch.isfinite(hidden).all()):
        raise _refuse(ecall, "hidden holds NaN or infinite values")
    if mask.dtype != torch.int64 or tuple(mask.shape) != (b, t):
        raise _refuse(
            ecall, f"attention_mask is {mask.dtype} {list(mask.shape)}; want int64 {b}×{t}"
        )
    if bool(((mask != 0) & (mask != 1)).any()) or bool((mask.sum(1) == 0).any()):
        raise _refuse(ecall, "attention_mask must hold 0/1 with at least one token per row")
    if not labels:
        return hidden, mask, None
    y = _tensor(frame, "labels", ecall)
    if spec.task == "seq-cls":
        ok = y.dtype == torch.int64 and tuple(y.shape) == (b,)
        ok = ok and bool(((y >= 0) & (y < (spec.num_labels or 0))).all())
        accepted = f"int64 ({b},) in 0..{(spec.num_labels or 0) - 1}"
    else:
        ok = y.dtype == torch.int64 and tuple(y.shape) == (b, t)
        ok = ok and bool((((y >= 0) & (y < spec.vocab_size)) | (y == -100)).all())
        accepted = f"int64 ({b}, {t}) token ids or -100"
    if not ok:
        raise _refuse(ecall, f"labels are {y.dtype} {list(y.shape)}; accepted: {accepted}")
    return hidden, mask, y
