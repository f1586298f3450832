"""Length-prefixed message pipe between the host and an enclave process.

Each message is ``u64 LE length || frame`` where the frame is a
:mod:`~shieldtune.crypto.framing` frame (never pickle).
"""

from __future__ import annotations

import select
import struct
import time
from typing import Protocol

from shieldtune.errors import EnclaveError

__all__ = ["write_message", "read_message", "PipeClosed", "Reader", "Writer"]

_LEN = struct.Struct("<Q")


class Reader(Protocol):
    """An unbuffered binary file we read from."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...  # noqa: D102

    def fileno(self) -> int: ...  # noqa: D102


class Writer(Protocol):
    """An unbuffered binary file we write to."""

    def write(self, data: memoryview, /) -> int | None: ...  # noqa: D102


class PipeClosed(EnclaveError):
    """The other end closed the pipe (process exited)."""


def write_message(f: Writer, data: bytes) -> None:
    """Write one message (blocking).

    Raises:
        PipeClosed: The reader is gone.
    """
    try:
        _write_all(f, _LEN.pack(len(data)))
        _write_all(f, data)
    except (BrokenPipeError, ConnectionResetError, ValueError) as err:
        raise PipeClosed(f"pipe closed while writing: {err}") from None


def _write_all(f: Writer, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = f.write(view)
        if n is None:  # pragma: no cover - only for non-blocking pipes
            continue
        view = view[n:]


def _read_exact(f: Reader, n: int, deadline: float | None) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    while pos < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([f], [], [], remaining)[0]:
                raise TimeoutError
        got = f.readinto(view[pos:])
        if not got:
            raise PipeClosed(f"pipe closed after {pos} of {n} bytes")
        pos += got
    return buf


def read_message(f: Reader, max_bytes: int, timeout: float | None = None) -> bytearray:
    """Read one message.

    Args:
        f: Unbuffered binary file.
        max_bytes: Largest accepted message.
        timeout: Seconds to wait in total; ``None`` waits forever.

    Returns:
        The message bytes.

    Raises:
        PipeClosed: The writer is gone.
        TimeoutError: ``timeout`` elapsed.
        EnclaveError: The declared length exceeds ``max_bytes``.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    (n,) = _LEN.unpack(_read_exact(f, _LEN.size, deadline))
    if n > max_bytes:
        raise EnclaveError(f"pipe message of {n} bytes exceeds the limit of {max_bytes}")
    return _read_exact(f, n, deadline)
