"""Sealed state: AES-256-GCM bound to the enclave measurement, with a rollback counter.

Blob layout::

    "STSL" || version (1) || SHA-256(measurement) (32) || round (u64 BE) || nonce (12)
    || AES-256-GCM(key, nonce, plaintext, aad = everything before the nonce)

``key = HKDF-SHA256(platform sealing secret, salt = label, info = measurement)``, so a different
measurement derives a different key and cannot unseal. The round is authenticated; the unsealer
compares it with a monotonic counter kept outside the blob: an older round is a rollback.

The pure functions (:func:`sealing_key`, :func:`seal_blob`, :func:`unseal_blob`) run inside the
enclave. :class:`FileCounter` and :func:`write_atomic` are host-side I/O.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shieldtune.errors import SealingError

__all__ = [
    "sealing_key",
    "seal_blob",
    "unseal_blob",
    "blob_round",
    "FileCounter",
    "counter_for",
    "write_atomic",
]

_MAGIC = b"STSL"
_VERSION = 1
_HEADER = struct.Struct(">4sB32sQ")
_NONCE = 12


def sealing_key(platform_secret: bytes, measurement: str) -> bytes:
    """Derive the 32-byte sealing key of one measurement from the platform's sealing secret."""
    if len(platform_secret) < 16:
        raise SealingError("platform sealing secret must be at least 16 bytes")
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"shieldtune-seal-v1",
        info=measurement.encode(),
    ).derive(platform_secret)


def _measurement_id(measurement: str) -> bytes:
    return hashlib.sha256(measurement.encode()).digest()


def seal_blob(key: bytes, measurement: str, round_: int, plaintext: bytes) -> bytes:
    """Encrypt state for this measurement at round ``round_``.

    Args:
        key: From :func:`sealing_key`.
        measurement: The sealing enclave's measurement (hex).
        round_: Monotonic round number (authenticated, checked on unseal).
        plaintext: The state (e.g. a framing frame of tensors).

    Returns:
        The sealed blob.
    """
    if not 0 <= round_ < 2**64:
        raise SealingError(f"round {round_} is outside 0..2^64-1")
    header = _HEADER.pack(_MAGIC, _VERSION, _measurement_id(measurement), round_)
    nonce = os.urandom(_NONCE)
    return header + nonce + AESGCM(key).encrypt(nonce, plaintext, header)


def blob_round(blob: bytes) -> int:
    """The (unauthenticated) round number in a blob's header.

    Raises:
        SealingError: Not a sealed blob.
    """
    return _parse_header(blob)[1]


def _parse_header(blob: bytes) -> tuple[bytes, int]:
    if len(blob) < _HEADER.size + _NONCE + 16:
        raise SealingError(f"sealed blob truncated ({len(blob)} bytes)")
    magic, version, mid, round_ = _HEADER.unpack_from(blob, 0)
    if magic != _MAGIC or version != _VERSION:
        raise SealingError(f"not a version-{_VERSION} sealed blob (magic {magic!r}, v{version})")
    return mid, round_


def unseal_blob(key: bytes, measurement: str, expected_round: int, blob: bytes) -> bytes:
    """Decrypt a blob sealed by this measurement at exactly ``expected_round``.

    Args:
        key: From :func:`sealing_key` for this enclave's measurement.
        measurement: This enclave's measurement.
        expected_round: The trusted counter's current value.
        blob: From :func:`seal_blob`.

    Returns:
        The plaintext.

    Raises:
        SealingError: Another measurement sealed it, it was tampered with, or its round is older
            (rollback) or newer (counter lost) than the counter.
    """
    mid, round_ = _parse_header(blob)
    if mid != _measurement_id(measurement):
        raise SealingError(
            "sealed state belongs to another enclave measurement; only the enclave build that "
            "sealed it can unseal it"
        )
    header = blob[: _HEADER.size]
    nonce = blob[_HEADER.size : _HEADER.size + _NONCE]
    try:
        plaintext = AESGCM(key).decrypt(nonce, blob[_HEADER.size + _NONCE :], header)
    except InvalidTag:
        raise SealingError(
            "sealed state failed authentication: tampered, or sealed on another platform"
        ) from None
    if round_ < expected_round:
        raise SealingError(
            f"sealed state is from round {round_} but the monotonic counter is at "
            f"{expected_round}: a rolled-back copy"
        )
    if round_ > expected_round:
        raise SealingError(
            f"sealed state is from round {round_}, ahead of the monotonic counter "
            f"({expected_round}): the counter was reset or lost"
        )
    return plaintext


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FileCounter:
    """A monotonic counter stored in a file (the simulated platform's counter service).

    A file on the host can itself be rolled back by the host: on hardware, back it with a
    trusted counter (TPM NV counter or a remote counter service). See docs/security-model.md.

    Args:
        path: Counter file; absent means 0.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def current(self) -> int:
        """The counter's value."""
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return 0
        try:
            return int(text)
        except ValueError:
            raise SealingError(f"monotonic counter file {self.path} is corrupt") from None

    def advance(self, to: int) -> None:
        """Move the counter forward to ``to``.

        Raises:
            SealingError: ``to`` is not greater than the current value.
        """
        now = self.current()
        if to <= now:
            raise SealingError(f"monotonic counter may only grow: {now} -> {to} refused")
        write_atomic(self.path, str(to).encode())


def counter_for(state_dir: Path, measurement: str, path: Path) -> FileCounter:
    """The counter guarding sealed file ``path`` of ``measurement``, kept under ``state_dir``.

    Keeping counters apart from the sealed files means restoring an old copy of the data folder
    (a backup, a snapshot) is detected as a rollback.
    """
    ident = hashlib.sha256(f"{measurement}:{Path(path).resolve()}".encode()).hexdigest()[:32]
    return FileCounter(Path(state_dir) / "counters" / ident)
