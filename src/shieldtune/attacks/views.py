"""What an attacker sees on the wire, and how it reads tensors out of it as best it can.

The channel record of a protected message is ``header ‖ AES-GCM(frame) ‖ tag``; the frame
(:mod:`shieldtune.crypto.framing`, a public format) ends with its tensors, each
``name_len, name, dtype, ndim, shape, data``, in a known order. AES-GCM is a stream cipher: every
ciphertext byte sits exactly where its plaintext byte was. So the strongest blind reading an
attacker without the key has is *layout-aware reinterpretation*: count back from the end of the
record (minus the tag) and read each tensor's bytes as that tensor, with the shape and dtype the
public protocol says it has. On a plain frame (trailer 0) the same reading returns the tensors
exactly; on a sealed record it returns keystream-whitened bytes of the right shape.
:func:`read_tail` is that reading; :func:`sanitize` makes the result usable (non-finite → 0).

:class:`WireTap` is the host operator's position: a gRPC server interceptor on the relay that
keeps every message byte for byte.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from shieldtune.crypto.framing import DTYPE_CODES

__all__ = [
    "AEAD_TAG_BYTES",
    "TensorSpec",
    "specs_of",
    "read_tail",
    "sanitize",
    "read_record",
    "WireTap",
]

#: Bytes after the ciphertext in a channel record: the AES-GCM authentication tag.
AEAD_TAG_BYTES = 16


@dataclass(frozen=True)
class TensorSpec:
    """Where the public protocol puts one tensor: its name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        numel = 1
        for n in self.shape:
            numel *= n
        return numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def entry_bytes(self) -> int:
        """Bytes of its frame entry: name_len u8, name, dtype u8, ndim u8, shape u64s, data."""
        return 3 + len(self.name.encode()) + 8 * len(self.shape) + self.nbytes


def specs_of(tensors: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """The specs of tensors in frame order (e.g. of a request the attacker can reproduce)."""
    return [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


def read_tail(
    payload: bytes, specs: Sequence[TensorSpec], trailer: int = 0
) -> dict[str, torch.Tensor]:
    """Read the last tensors of a frame by layout alone, without parsing (or decrypting) it.

    Args:
        payload: A frame (``trailer=0``) or a channel record (``trailer=AEAD_TAG_BYTES``).
        specs: The frame's tensors, in frame order; they must be the last entries of the frame.
        trailer: Bytes after the frame's last byte.

    Returns:
        ``name -> tensor`` of the given shapes and dtypes (new memory): the tensors themselves
        for a plain frame, bytes reinterpreted for a sealed record.

    Raises:
        ValueError: An unsupported dtype, or the payload is too short for the layout.
    """
    for spec in specs:
        if spec.dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {spec.name!r}: dtype {spec.dtype} is not a frame dtype")
    start = len(payload) - trailer - sum(s.entry_bytes for s in specs)
    if start < 0 or trailer < 0:
        raise ValueError(
            f"payload of {len(payload)} bytes is too short for tensors "
            f"{[s.name for s in specs]} plus a {trailer}-byte trailer"
        )
    out: dict[str, torch.Tensor] = {}
    offset = start
    for spec in specs:
        offset += spec.entry_bytes - spec.nbytes  # skip the entry header
        raw = bytearray(payload[offset : offset + spec.nbytes])
        flat = torch.frombuffer(raw, dtype=spec.dtype) if raw else torch.empty(0, dtype=spec.dtype)
        out[spec.name] = flat.reshape(spec.shape).clone()
        offset += spec.nbytes
    return out


def sanitize(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy with NaN and ±Inf set to 0 (what an attacker does with unreadable values)."""
    return torch.nan_to_num(t.float(), nan=0.0, posinf=0.0, neginf=0.0)


def read_record(
    payload: bytes, specs: Sequence[TensorSpec], *, sealed: bool
) -> dict[str, torch.Tensor]:
    """:func:`read_tail` for a plain frame or a sealed record, floating tensors sanitized.

    Args:
        payload: The bytes the attacker captured for one message.
        specs: The message's tensors, in frame order.
        sealed: Whether the payload is a channel record (AES-GCM tag at the end).

    Returns:
        ``name -> tensor``; floating tensors as float32 with non-finite values set to 0.
    """
    read = read_tail(payload, specs, AEAD_TAG_BYTES if sealed else 0)
    return {n: sanitize(t) if t.is_floating_point() else t for n, t in read.items()}


class WireTap(grpc.ServerInterceptor):
    """Keeps every gRPC message the server receives or sends: ``(method, direction, bytes)``.

    Installed on the host's relay (``SplitService(..., interceptors=[tap])``), it is exactly
    the host operator's view of the traffic. ``direction`` is ``in`` (client to host) or
    ``out``.
    """

    def __init__(self) -> None:
        self.messages: list[tuple[str, str, bytes]] = []
        self._lock = threading.Lock()

    def _keep(self, method: str, direction: str, data: bytes) -> None:
        with self._lock:
            self.messages.append((method, direction, bytes(data)))

    def received(self, method_suffix: str = "/Session") -> list[bytes]:
        """Messages received on methods ending with ``method_suffix``, in arrival order."""
        with self._lock:
            return [d for m, way, d in self.messages if way == "in" and m.endswith(method_suffix)]

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        """Wrap the unary and bidirectional-streaming handlers so every message is kept."""
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            def unary(request: bytes, context: Any) -> bytes:
                self._keep(method, "in", request)
                reply = inner_unary(request, context)
                self._keep(method, "out", reply)
                return reply

            return grpc.unary_unary_rpc_method_handler(unary)
        inner_stream = handler.stream_stream

        def stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
            def tapped() -> Iterator[bytes]:
                for request in requests:
                    self._keep(method, "in", request)
                    yield request

            for reply in inner_stream(tapped(), context):
                self._keep(method, "out", reply)
                yield reply

        return grpc.stream_stream_rpc_method_handler(stream)
