"""Simulated backend: an ordinary OS process and a software platform key. NO hardware protection.

What it gives: process isolation from the *host program's* bugs (separate address space, a
narrow typed call interface), a measurement of the program's code and config, quotes signed by a
per-machine Ed25519 key, measurement-bound sealing, and the full channel and audit machinery, so
every code path of a real deployment runs. What it does not give: any protection against the
machine's owner, operator, OS or anyone who can read the platform key file or the process's
memory. Every quote says ``"simulated": true`` and a strict
:class:`~shieldtune.tee.attestation.Policy` refuses it.

The platform secret lives at ``~/.cache/shieldtune/sim_platform_key`` (override with the
``SHIELDTUNE_SIM_PLATFORM_KEY`` environment variable): a 32-byte secret from which the quote
signing key and the sealing secret are derived. The enclave process never receives it (its
environment is reduced to an allow-list), only its own measurement-bound sealing key.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shieldtune.crypto.framing import MetaValue
from shieldtune.errors import EnclaveError
from shieldtune.tee.attestation import Evidence, sign_simulated_quote
from shieldtune.tee.enclave import ENCLAVE_BACKENDS
from shieldtune.tee.process import ProcessEnclave
from shieldtune.tee.program import measure_program
from shieldtune.tee.sealing import FileCounter, counter_for, sealing_key

__all__ = [
    "PLATFORM_KEY_ENV",
    "default_platform_key_path",
    "SimulatedPlatform",
    "simulated_enclave",
]

PLATFORM_KEY_ENV = "SHIELDTUNE_SIM_PLATFORM_KEY"


def default_platform_key_path() -> Path:
    """``$SHIELDTUNE_SIM_PLATFORM_KEY`` or ``~/.cache/shieldtune/sim_platform_key``."""
    env = os.environ.get(PLATFORM_KEY_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "shieldtune" / "sim_platform_key"


def _load_or_create_secret(path: Path) -> bytes:
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        secret = os.urandom(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first
            secret = path.read_bytes()
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
    if len(secret) != 32:
        raise EnclaveError(
            f"simulated platform key {path} is corrupt ({len(secret)} bytes, want 32)"
        )
    return secret


def _derive(secret: bytes, label: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, b"shieldtune-sim-platform-v1", label).derive(secret)


class SimulatedPlatform:
    """The simulated "hardware": launches ``python -m shieldtune.tee.runtime``, signs quotes.

    Args:
        key_path: Platform secret file; :func:`default_platform_key_path` if None.
    """

    name = "simulated"
    simulated = True
    quote_source = "host"
    sealing = "provided"
    attestation_root = ""

    def __init__(self, key_path: Path | None = None) -> None:
        self.key_path = Path(key_path) if key_path is not None else default_platform_key_path()
        secret = _load_or_create_secret(self.key_path)
        self._signing_key = Ed25519PrivateKey.from_private_bytes(_derive(secret, b"quote signing"))
        self._seal_secret = _derive(secret, b"sealing")
        self.public_key_hex = self._signing_key.public_key().public_bytes_raw().hex()

    def command(self, program: str) -> list[str]:
        """``python -m shieldtune.tee.runtime`` with this interpreter."""
        return [sys.executable, "-m", "shieldtune.tee.runtime"]

    def measurement(self, program: str, config: Mapping[str, MetaValue]) -> str:
        """SHA-256 of the program's trusted code and config."""
        return measure_program(program, config)

    def sealing_key(self, measurement: str) -> bytes:
        """Sealing key bound to ``measurement`` (the platform secret itself never leaves)."""
        return sealing_key(self._seal_secret, measurement)

    def host_quote(
        self, measurement: str, report_data: bytes, nonce: bytes, program: str
    ) -> Evidence:
        """Sign a simulated quote (always marked ``simulated: true``)."""
        return sign_simulated_quote(
            self._signing_key,
            measurement=measurement,
            report_data=report_data,
            nonce=nonce,
            timestamp=int(time.time()),
            program=program,
        )

    def complete_evidence(self, evidence: Evidence) -> Evidence:
        """Nothing to attach: simulated quotes carry everything."""
        return evidence

    def counter(self, measurement: str, path: Path) -> FileCounter:
        """Platform-side counter for the sealed file, kept next to the platform key."""
        return counter_for(self.key_path.parent, measurement, path)


def simulated_enclave(
    program: str,
    config: Mapping[str, MetaValue] | None = None,
    *,
    platform_key: Path | None = None,
    **kwargs: Any,
) -> ProcessEnclave:
    """A simulated enclave (not started).

    Args:
        program: Registered enclave program name.
        config: Program config (measured).
        platform_key: Platform secret file (tests pass a temporary one).
        **kwargs: :class:`~shieldtune.tee.enclave.ProcessEnclave` options.
    """
    return ProcessEnclave(program, config, platform=SimulatedPlatform(platform_key), **kwargs)


ENCLAVE_BACKENDS.register("simulated", simulated_enclave)
