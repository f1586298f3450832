"""Boundary audit log: one record per message that crosses a TEE boundary.

Each :class:`Crossing` says which way it went, which call, how many bytes, the shapes of the
tensors *as they appear on the wire*, and their protection:

- ``clear``: readable by whoever sees the boundary (host, operator, driver);
- ``masked``: one-time-pad masked by the sender (declared by the caller that masked it);
- ``encrypted``: AEAD ciphertext of the attested channel or a sealed blob.

Later components assert from the log that no secret crossed in the clear
(:meth:`AuditLog.assert_nothing_clear`).
"""

from __future__ import annotations

import fnmatch
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from shieldtune.errors import IntegrityError

__all__ = ["Direction", "Protection", "PROTECTIONS", "TensorInfo", "Crossing", "AuditLog"]

Direction = Literal["host->enclave", "enclave->host"]
Protection = Literal["clear", "masked", "encrypted"]
PROTECTIONS: tuple[str, ...] = ("clear", "masked", "encrypted")


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype and shape of one tensor on the wire."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Crossing:
    """One boundary crossing.

    Attributes:
        time: Seconds since the epoch.
        enclave: Name of the enclave program.
        direction: ``host->enclave`` or ``enclave->host``.
        call: The operation or ECALL name.
        nbytes: Bytes that crossed.
        protection: ``clear``, ``masked`` or ``encrypted``.
        tensors: Tensors in the message, as seen on the wire.
    """

    time: float
    enclave: str
    direction: Direction
    call: str
    nbytes: int
    protection: Protection
    tensors: tuple[TensorInfo, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        """One JSON line."""
        return json.dumps(asdict(self), separators=(",", ":"))


class AuditLog:
    """Thread-safe in-memory log of crossings, optionally mirrored to a JSONL file.

    Args:
        path: If given, each crossing is appended to this file as one JSON line.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._records: list[Crossing] = []
        self._lock = threading.Lock()

    def record(
        self,
        *,
        enclave: str,
        direction: Direction,
        call: str,
        nbytes: int,
        protection: Protection,
        tensors: tuple[TensorInfo, ...] = (),
    ) -> Crossing:
        """Append one crossing (and write it to the JSONL file, if any).

        Raises:
            ValueError: Unknown protection or direction (a programming error).
        """
        if protection not in PROTECTIONS:
            raise ValueError(f"protection {protection!r} unknown; accepted {PROTECTIONS}")
        if direction not in ("host->enclave", "enclave->host"):
            raise ValueError(f"direction {direction!r} unknown")
        crossing = Crossing(time.time(), enclave, direction, call, nbytes, protection, tensors)
        with self._lock:
            self._records.append(crossing)
            if self.path is not None:
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(crossing.to_json() + "\n")
        return crossing

    @property
    def records(self) -> list[Crossing]:
        """A copy of all crossings so far."""
        with self._lock:
            return list(self._records)

    def clear_crossings(self, kind: str) -> list[Crossing]:
        """Crossings in the clear that carried a tensor whose name matches ``kind``.

        Args:
            kind: A tensor name or shell-style pattern (``"lora_*"``, ``"hidden"``).
        """
        return [
            c
            for c in self.records
            if c.protection == "clear" and any(fnmatch.fnmatchcase(t.name, kind) for t in c.tensors)
        ]

    def assert_nothing_clear(self, kind: str) -> None:
        """Raise unless no tensor named like ``kind`` ever crossed in the clear.

        Raises:
            IntegrityError: Lists the offending crossings.
        """
        bad = self.clear_crossings(kind)
        if bad:
            lines = [f"{c.direction} {c.call} ({c.nbytes} bytes)" for c in bad[:5]]
            raise IntegrityError(
                f"{len(bad)} crossing(s) carried {kind!r} in the clear: " + "; ".join(lines)
            )

    @staticmethod
    def read_jsonl(path: Path) -> list[Crossing]:
        """Load crossings written by an :class:`AuditLog` with a path."""
        out = []
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            d = json.loads(line)
            tensors = tuple(
                TensorInfo(t["name"], t["dtype"], tuple(t["shape"])) for t in d["tensors"]
            )
            out.append(Crossing(**{**d, "tensors": tensors}))
        return out
