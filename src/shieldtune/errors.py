"""Error hierarchy and the CLI's documented exit codes.

Every error a user can cause derives from :class:`ShieldtuneError`. The CLI maps each class to a
numbered exit code (see :data:`EXIT_CODES`) and prints one line naming the problem.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "ShieldtuneError",
    "ConfigError",
    "DataError",
    "ModelError",
    "AttestationError",
    "ChannelError",
    "IntegrityError",
    "MaskReuseError",
    "EncodingError",
    "SealingError",
    "EnclaveError",
    "ExitCode",
    "EXIT_CODES",
    "exit_code_for",
]


class ShieldtuneError(Exception):
    """Base class of every error shieldtune raises on bad input or a refused operation."""


class ConfigError(ShieldtuneError):
    """A configuration is invalid. Collects every problem found, one per line.

    Args:
        problems: One human-readable line per problem (field, bad value, accepted values).
    """

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class DataError(ShieldtuneError):
    """A dataset is missing, empty, or does not have the expected columns."""


class ModelError(ShieldtuneError):
    """A model cannot be loaded or sliced as asked (unknown family, cut out of range...)."""


class AttestationError(ShieldtuneError):
    """Attestation evidence failed verification or policy."""


class ChannelError(ShieldtuneError):
    """The secure channel refused a message (bad tag, replay, reorder, handshake failure)."""


class IntegrityError(ShieldtuneError):
    """A computation or file failed an integrity check."""


class MaskReuseError(ShieldtuneError):
    """A one-time mask was about to be used a second time."""


class EncodingError(ShieldtuneError):
    """A value cannot be encoded exactly (fixed-point overflow, non-finite input, small field)."""


class SealingError(ShieldtuneError):
    """Sealed state cannot be unsealed (other measurement, tampering, rollback)."""


class EnclaveError(ShieldtuneError):
    """The enclave process failed, died, or refused a call."""


class ExitCode(IntEnum):
    """Documented CLI exit codes."""

    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    CONFIG = 3
    DATA = 4
    MODEL = 5
    ATTESTATION = 6
    CHANNEL = 7
    INTEGRITY = 8
    MASK_REUSE = 9
    SEALING = 10
    ENCLAVE = 11
    OTHER = 12


EXIT_CODES: dict[type[ShieldtuneError], ExitCode] = {
    ConfigError: ExitCode.CONFIG,
    DataError: ExitCode.DATA,
    ModelError: ExitCode.MODEL,
    AttestationError: ExitCode.ATTESTATION,
    ChannelError: ExitCode.CHANNEL,
    IntegrityError: ExitCode.INTEGRITY,
    MaskReuseError: ExitCode.MASK_REUSE,
    EncodingError: ExitCode.INTEGRITY,
    SealingError: ExitCode.SEALING,
    EnclaveError: ExitCode.ENCLAVE,
}


def exit_code_for(err: ShieldtuneError) -> ExitCode:
    """Return the documented exit code of an error (most specific class wins).

    Args:
        err: The error raised.

    Returns:
        The exit code the CLI uses for it.
    """
    for cls in type(err).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return ExitCode.OTHER
