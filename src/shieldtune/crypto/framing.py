"""Compact, versioned wire format for tensors plus small metadata (no pickle).

A frame carries one message: a metadata dictionary and any number of named tensors. It is the
plaintext inside the channel's AEAD payload and the unit of the enclave pipe protocol.

Layout (all integers little-endian)::

    magic      4s   b"STFR"
    version    u8   1
    flags      u8   0 (reserved, must be 0)
    n_tensors  u16
    meta_len   u32
    meta       meta_len bytes of UTF-8 JSON: an object whose values are str / int / float /
               bool / null, or flat lists of those
    n_tensors times:
        name_len  u8, name (UTF-8, 1..255 bytes, unique in the frame)
        dtype     u8   (see DTYPE_CODES)
        ndim      u8
        shape     ndim x u64
        data      prod(shape) * itemsize raw bytes, C order, little-endian

Parsing is strict: wrong magic or version, non-zero flags, limits exceeded (:class:`FrameLimits`),
truncated or trailing bytes, malformed metadata and invalid ``bool`` bytes are all refused with
:class:`~shieldtune.errors.ChannelError`. A frame never allocates more than its own size (every
length is checked against the remaining bytes before anything is allocated).
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from shieldtune.errors import ChannelError

__all__ = [
    "MAGIC",
    "VERSION",
    "DTYPE_CODES",
    "FrameLimits",
    "Frame",
    "MetaValue",
    "encode_frame",
    "decode_frame",
    "bytes_to_tensor",
    "tensor_to_bytes",
]

MAGIC = b"STFR"
VERSION = 1

Scalar = str | int | float | bool | None
MetaValue = Scalar | list[Scalar]

#: Wire code of every supported dtype. Codes are part of the format: never renumber.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.bfloat16: 2,
    torch.float16: 3,
    torch.int64: 4,
    torch.int32: 5,
    torch.uint8: 6,
    torch.bool: 7,
    torch.float64: 8,
    torch.int8: 9,
}
_DTYPES: dict[int, torch.dtype] = {code: dt for dt, code in DTYPE_CODES.items()}
_HEADER = struct.Struct("<4sBBHI")
_U64 = struct.Struct("<Q")

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("shieldtune.crypto.framing supports little-endian hosts only")


@dataclass(frozen=True)
class FrameLimits:
    """Upper bounds a receiver enforces before allocating anything.

    Attributes:
        max_bytes: Largest accepted frame, in bytes (header, metadata and data together).
        max_tensors: Most tensors in one frame.
        max_ndim: Most dimensions of one tensor.
        max_elements: Most elements of one tensor.
        max_meta_bytes: Largest metadata JSON, in bytes.
    """

    max_bytes: int = 1 << 30
    max_tensors: int = 1024
    max_ndim: int = 8
    max_elements: int = 1 << 31
    max_meta_bytes: int = 64 * 1024


@dataclass
class Frame:
    """One decoded message.

    Attributes:
        meta: Small metadata (strings, numbers, booleans, null, flat lists of those).
        tensors: Named tensors, in wire order.
    """

    meta: dict[str, MetaValue] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def meta_int(self, key: str, default: int | None = None) -> int:
        """Metadata ``key`` as an int (bools refused).

        Raises:
            ChannelError: Missing without a default, or not an int.
        """
        value = self.meta.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ChannelError(f"metadata {key!r} must be an integer, got {value!r}")
        return value

    def meta_float(self, key: str, default: float | None = None) -> float:
        """Metadata ``key`` as a float (ints accepted, bools refused).

        Raises:
            ChannelError: Missing without a default, or not a number.
        """
        value = self.meta.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ChannelError(f"metadata {key!r} must be a number, got {value!r}")
        return float(value)

    def meta_str(self, key: str, default: str | None = None) -> str:
        """Metadata ``key`` as a str.

        Raises:
            ChannelError: Missing without a default, or not a string.
        """
        value = self.meta.get(key, default)
        if not isinstance(value, str):
            raise ChannelError(f"metadata {key!r} must be a string, got {value!r}")
        return value


def encode_frame(
    meta: Mapping[str, MetaValue] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
    limits: FrameLimits | None = None,
) -> bytes:
    """Serialise metadata and tensors into one frame.

    Args:
        meta: Metadata; values must be str/int/float/bool/None or flat lists of those.
        tensors: Named tensors of a supported dtype (any device; copied to CPU, C order).
        limits: Limits the frame must respect (the receiver's, so a frame we send is one it
            accepts). Defaults to :class:`FrameLimits`.

    Returns:
        The frame bytes.

    Raises:
        ChannelError: Unsupported dtype, bad metadata or tensor name, or a limit exceeded.
    """
    limits = limits or FrameLimits()
    meta = dict(meta or {})
    tensors = dict(tensors or {})
    _check_meta(meta)
    meta_bytes = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
    if len(meta_bytes) > limits.max_meta_bytes:
        raise ChannelError(
            f"frame metadata is {len(meta_bytes)} bytes, limit max_meta_bytes="
            f"{limits.max_meta_bytes}; send large values as tensors"
        )
    if len(tensors) > limits.max_tensors:
        raise ChannelError(
            f"frame has {len(tensors)} tensors, limit max_tensors={limits.max_tensors}"
        )
    parts: list[bytes | memoryview] = [
        _HEADER.pack(MAGIC, VERSION, 0, len(tensors), len(meta_bytes)),
        meta_bytes,
    ]
    for name, tensor in tensors.items():
        parts.extend(_encode_tensor(name, tensor, limits))
    total = sum(len(p) for p in parts)
    if total > limits.max_bytes:
        raise ChannelError(f"frame is {total} bytes, limit max_bytes={limits.max_bytes}")
    return b"".join(parts)  # the only copy of the tensor data


def _encode_tensor(
    name: str, tensor: torch.Tensor, limits: FrameLimits
) -> list[bytes | memoryview]:
    name_b = name.encode() if isinstance(name, str) else b""
    if not 1 <= len(name_b) <= 255:
        raise ChannelError(f"tensor name {name!r} must be a str of 1..255 UTF-8 bytes")
    if not isinstance(tensor, torch.Tensor):
        raise ChannelError(f"tensor {name!r} is a {type(tensor).__name__}, expected torch.Tensor")
    code = DTYPE_CODES.get(tensor.dtype)
    if code is None:
        accepted = ", ".join(str(d).removeprefix("torch.") for d in DTYPE_CODES)
        raise ChannelError(f"tensor {name!r} has dtype {tensor.dtype}; accepted: {accepted}")
    if tensor.dim() > limits.max_ndim:
        raise ChannelError(
            f"tensor {name!r} has {tensor.dim()} dims, limit max_ndim={limits.max_ndim}"
        )
    if tensor.numel() > limits.max_elements:
        raise ChannelError(
            f"tensor {name!r} has {tensor.numel()} elements, limit "
            f"max_elements={limits.max_elements}"
        )
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
    raw = flat.view(torch.uint8).numpy().data if flat.numel() else b""  # a view: no copy yet
    head = struct.pack(
        f"<B{len(name_b)}sBB{tensor.dim()}Q", len(name_b), name_b, code, tensor.dim(), *tensor.shape
    )
    return [head, raw]


def decode_frame(data: bytes | bytearray | memoryview, limits: FrameLimits | None = None) -> Frame:
    """Parse one frame strictly.

    Args:
        data: The frame bytes.
        limits: Limits to enforce; defaults to :class:`FrameLimits`.

    Returns:
        The decoded frame; tensors are fresh, writable CPU tensors.

    Raises:
        ChannelError: Any deviation from the format, with what was wrong and where.
    """
    limits = limits or FrameLimits()
    buf = memoryview(data).cast("B")
    if len(buf) > limits.max_bytes:
        raise ChannelError(f"frame is {len(buf)} bytes, limit max_bytes={limits.max_bytes}")
    if len(buf) < _HEADER.size:
        raise ChannelError(f"frame truncated: {len(buf)} bytes, header needs {_HEADER.size}")
    magic, version, flags, n_tensors, meta_len = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ChannelError(f"not a shieldtune frame: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ChannelError(f"unsupported frame version {version}; this build reads {VERSION}")
    if flags != 0:
        raise ChannelError(f"frame flags {flags:#04x} set; version {VERSION} requires 0")
    if n_tensors > limits.max_tensors:
        raise ChannelError(
            f"frame declares {n_tensors} tensors, limit max_tensors={limits.max_tensors}"
        )
    if meta_len > limits.max_meta_bytes:
        raise ChannelError(
            f"frame metadata declares {meta_len} bytes, limit "
            f"max_meta_bytes={limits.max_meta_bytes}"
        )
    pos = _HEADER.size
    meta = _decode_meta(_take(buf, pos, meta_len, "metadata"))
    pos += meta_len
    tensors: dict[str, torch.Tensor] = {}
    for index in range(n_tensors):
        name, tensor, pos = _decode_tensor(buf, pos, index, limits)
        if name in tensors:
            raise ChannelError(f"frame repeats tensor name {name!r}")
        tensors[name] = tensor
    if pos != len(buf):
        raise ChannelError(f"frame has {len(buf) - pos} trailing bytes after the last tensor")
    return Frame(meta=meta, tensors=tensors)


def _take(buf: memoryview, pos: int, n: int, what: str) -> memoryview:
    if n < 0 or pos + n > len(buf):
        raise ChannelError(
            f"frame truncated in {what}: needs {n} bytes at offset {pos}, {len(buf) - pos} left"
        )
    return buf[pos : pos + n]


def _decode_tensor(
    buf: memoryview, pos: int, index: int, limits: FrameLimits
) -> tuple[str, torch.Tensor, int]:
    where = f"tensor #{index}"
    name_len = _take(buf, pos, 1, f"{where} name length")[0]
    pos += 1
    try:
        name = bytes(_take(buf, pos, name_len, f"{where} name")).decode("utf-8")
    except UnicodeDecodeError:
        raise ChannelError(f"{where} name is not valid UTF-8") from None
    if not name:
        raise ChannelError(f"{where} has an empty name")
    pos += name_len
    code, ndim = _take(buf, pos, 2, f"{where} dtype/ndim")
    pos += 2
    dtype = _DTYPES.get(code)
    if dtype is None:
        raise ChannelError(
            f"tensor {name!r}: unknown dtype code {code}; accepted {sorted(_DTYPES)}"
        )
    if ndim > limits.max_ndim:
        raise ChannelError(f"tensor {name!r} has {ndim} dims, limit max_ndim={limits.max_ndim}")
    shape_raw = _take(buf, pos, 8 * ndim, f"tensor {name!r} shape")
    shape = [_U64.unpack_from(shape_raw, 8 * i)[0] for i in range(ndim)]
    pos += 8 * ndim
    numel = math.prod(shape)
    if numel > limits.max_elements or any(d > limits.max_elements for d in shape):
        raise ChannelError(
            f"tensor {name!r} shape {shape} has {numel} elements, limit max_elements="
            f"{limits.max_elements}"
        )
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = _take(buf, pos, numel * itemsize, f"tensor {name!r} data")
    pos += numel * itemsize
    if numel == 0:
        return name, torch.empty(shape, dtype=dtype), pos
    if dtype == torch.bool and bytes(raw).translate(None, b"\x00\x01"):
        raise ChannelError(f"tensor {name!r}: bool data holds bytes other than 0 and 1")
    tensor = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
    return name, tensor, pos


def _reject_constant(token: str) -> float:
    raise ValueError(f"non-finite number {token} is not allowed")


def _unique_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _decode_meta(raw: memoryview) -> dict[str, MetaValue]:
    if len(raw) == 0:
        raise ChannelError("frame metadata is empty; expected a JSON object")
    try:
        text = bytes(raw).decode("utf-8")
        obj = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_object)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ChannelError(f"frame metadata is not valid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise ChannelError(f"frame metadata is a JSON {type(obj).__name__}, expected an object")
    _check_meta(obj)
    return obj


def _check_meta(meta: Mapping[Any, object]) -> None:
    for key, value in meta.items():
        if not isinstance(key, str):
            raise ChannelError(f"metadata key {key!r} is not a str")
        values = value if isinstance(value, list) else [value]
        for item in values:
            if item is not None and not isinstance(item, (str, int, float, bool)):
                raise ChannelError(
                    f"metadata {key!r} holds a {type(item).__name__}; accepted: str, int, float, "
                    "bool, None or a flat list of those"
                )
            if isinstance(item, float) and not math.isfinite(item):
                raise ChannelError(f"metadata {key!r} holds a non-finite float {item}")


def bytes_to_tensor(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Wrap raw bytes as a fresh 1-D ``uint8`` tensor (to carry ciphertext in a frame)."""
    if len(data) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a 1-D ``uint8`` tensor.

    Raises:
        ChannelError: Not a 1-D ``uint8`` tensor.
    """
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise ChannelError(
            f"expected a 1-D uint8 tensor of bytes, got {tensor.dtype} {list(tensor.shape)}"
        )
    return tensor.contiguous().numpy().tobytes()
