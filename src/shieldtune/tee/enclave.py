"""The ``Enclave`` interface, the ``Platform`` a backend provides, and the backend registry.

An enclave runs one enclave program (see :mod:`shieldtune.tee.program`) in its own OS process
(:class:`~shieldtune.tee.process.ProcessEnclave`). The host reaches it only through named ECALLs
carried as typed frames (:mod:`shieldtune.crypto.framing`; never pickle). A :class:`Platform`
says how the process is launched, measured, quoted and given a sealing key: the simulated
platform (:mod:`shieldtune.tee.backends.simulated`), configfs-tsm (TDX / SEV-SNP), Gramine-SGX.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch

from shieldtune import errors
from shieldtune.crypto.framing import Frame, MetaValue
from shieldtune.errors import EnclaveError
from shieldtune.registry import Registry
from shieldtune.tee.attestation import Evidence
from shieldtune.tee.audit import Protection
from shieldtune.tee.sealing import FileCounter

__all__ = [
    "Enclave",
    "Platform",
    "MemoryReport",
    "ENCLAVE_BACKENDS",
    "create_enclave",
    "raise_error_frame",
]

_ERRORS: dict[str, type[errors.ShieldtuneError]] = {
    cls.__name__: cls
    for cls in (
        errors.ChannelError,
        errors.SealingError,
        errors.EnclaveError,
        errors.AttestationError,
        errors.IntegrityError,
        errors.MaskReuseError,
        errors.ConfigError,
    )
}


def raise_error_frame(frame: Frame, where: str) -> None:
    """Raise the error an ``{"op": "error"}`` frame describes (EnclaveError if unknown)."""
    if frame.meta.get("op") != "error":
        return
    cls = _ERRORS.get(str(frame.meta.get("type")), EnclaveError)
    raise cls(f"{where}: {frame.meta.get('message')}")


@dataclass(frozen=True)
class MemoryReport:
    """Enclave memory use.

    Attributes:
        budget_bytes: The enforced budget for enclave-resident tensors plus the message in flight.
        state_bytes: Bytes of enclave-resident tensors now.
        peak_bytes: Highest tracked use so far.
        max_rss_bytes: Peak resident set size of the enclave process (interpreter included).
        sessions: Open channel sessions.
    """

    budget_bytes: int
    state_bytes: int
    peak_bytes: int
    max_rss_bytes: int
    sessions: int


class Platform(Protocol):
    """How a backend launches, measures, quotes and keys an enclave process."""

    name: str
    simulated: bool
    quote_source: str  # "host": the platform signs; "tsm" / "gramine": the enclave quotes itself
    sealing: str  # "provided": sealing_key() is sent at start; "gramine": in-enclave; "none"
    attestation_root: str

    def command(self, program: str) -> list[str]:
        """Command line that starts the enclave runtime."""
        ...

    def measurement(self, program: str, config: Mapping[str, MetaValue]) -> str:
        """The measurement this platform will attest for the program."""
        ...

    def sealing_key(self, measurement: str) -> bytes | None:
        """Measurement-bound sealing key handed to the enclave (``sealing == "provided"``)."""
        ...

    def host_quote(
        self, measurement: str, report_data: bytes, nonce: bytes, program: str
    ) -> Evidence:
        """Evidence produced outside the enclave (``quote_source == "host"``)."""
        ...

    def counter(self, measurement: str, path: Path) -> FileCounter:
        """The monotonic counter that guards the sealed file ``path``."""
        ...

    def complete_evidence(self, evidence: Evidence) -> Evidence:
        """Attach public verification material (DCAP collateral) the enclave cannot fetch."""
        ...


class Enclave(ABC):
    """A running enclave program, reached only through named calls.

    Use as a context manager: ``with create_enclave("simulated", "echo") as enclave: ...``.
    """

    program: str
    measurement: str
    simulated: bool

    @abstractmethod
    def start(self) -> Enclave:
        """Launch the enclave process and wait until it serves."""

    @abstractmethod
    def stop(self) -> None:
        """Shut the enclave down cleanly (kill it if it does not answer)."""

    @abstractmethod
    def call(
        self,
        ecall: str,
        meta: Mapping[str, MetaValue] | None = None,
        tensors: Mapping[str, torch.Tensor] | None = None,
        *,
        protection: Protection = "clear",
        timeout: float | None = None,
    ) -> Frame:
        """Run ECALL ``ecall``; arguments cross the boundary as declared in ``protection``."""

    @abstractmethod
    def open_channel(self, hello: bytes) -> tuple[int, bytes]:
        """Relay a client hello; return the session id and the server hello (with evidence)."""

    @abstractmethod
    def relay(self, session: int, record: bytes) -> bytes:
        """Relay one encrypted record to the enclave and return its encrypted reply."""

    @abstractmethod
    def close_channel(self, session: int) -> None:
        """Forget a channel session inside the enclave."""

    @abstractmethod
    def quote(self, report_data: bytes, nonce: bytes = b"") -> Evidence:
        """Attestation evidence binding ``report_data`` (64 bytes)."""

    @abstractmethod
    def seal(self, path: Path) -> int:
        """Seal the enclave state to ``path`` at the next round; return that round."""

    @abstractmethod
    def unseal(self, path: Path) -> int:
        """Restore the enclave state from ``path``; return its round."""

    @abstractmethod
    def memory(self) -> MemoryReport:
        """Current memory use and budget."""

    def __enter__(self) -> Enclave:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


#: Backends by name: factory(program, config, **kwargs) -> Enclave.
ENCLAVE_BACKENDS: Registry[Callable[..., Enclave]] = Registry("enclave backend")


def create_enclave(
    backend: str, program: str, config: Mapping[str, MetaValue] | None = None, **kwargs: Any
) -> Enclave:
    """Build (not start) an enclave of a registered backend.

    Args:
        backend: ``simulated``, ``tdx``, ``sev-snp`` or ``gramine-sgx``.
        program: Registered enclave program name.
        config: Program config.
        **kwargs: Passed to the backend (memory_budget_mb, audit, ...).

    Raises:
        ConfigError: Unknown backend or program.
    """
    import shieldtune.tee.backends  # noqa: F401  (registers the backends)

    return ENCLAVE_BACKENDS.get(backend, field="backend")(program, config, **kwargs)
