"""Evidence a TEE presents and the claims (:class:`Quote`) read from it once authenticated."""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from shieldtune.errors import AttestationError

__all__ = [
    "EvidenceKind",
    "EVIDENCE_KINDS",
    "Evidence",
    "Quote",
    "CollateralSource",
    "attach_collateral",
    "unix_time",
]

EvidenceKind = Literal["simulated", "sgx-dcap", "tdx-dcap", "sev-snp"]
EVIDENCE_KINDS: tuple[str, ...] = ("simulated", "sgx-dcap", "tdx-dcap", "sev-snp")

_MAX_EVIDENCE_BYTES = 1 << 20


def unix_time(now: datetime | float | None = None) -> int:
    """Seconds since the epoch of ``now`` (aware datetime or number); the current time if None."""
    if now is None:
        return int(time.time())
    if isinstance(now, datetime):
        if now.tzinfo is None:
            raise AttestationError("verification time must be timezone-aware (e.g. UTC)")
        return int(now.timestamp())
    return int(now)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(value: Any, name: str) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise AttestationError(f"evidence field {name!r} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise AttestationError(f"evidence field {name!r} is not valid base64") from None


@dataclass(frozen=True)
class Evidence:
    """What a TEE presents: a quote or report plus what is needed to verify it offline.

    Attributes:
        kind: One of :data:`EVIDENCE_KINDS`.
        quote: Simulated: the signed JSON quote; SGX/TDX: the raw DCAP quote; SEV-SNP: the raw
            1184-byte attestation report.
        collateral: SGX/TDX: the DCAP collateral JSON (``dcap_qvl.QuoteCollateralV3`` format).
        vcek: SEV-SNP: the VCEK certificate (DER).
        cert_chain: SEV-SNP: the ASK and ARK certificates (PEM).
    """

    kind: EvidenceKind
    quote: bytes
    collateral: str | None = None
    vcek: bytes | None = None
    cert_chain: bytes | None = None

    def to_json(self) -> str:
        """Serialise (binary fields in base64)."""
        return json.dumps(
            {
                "kind": self.kind,
                "quote": _b64(self.quote),
                "collateral": self.collateral,
                "vcek": _b64(self.vcek),
                "cert_chain": None if self.cert_chain is None else self.cert_chain.decode(),
            },
            sort_keys=True,
        )

    def to_bytes(self) -> bytes:
        """UTF-8 of :meth:`to_json` (what a server hello carries)."""
        return self.to_json().encode()

    @classmethod
    def from_json(cls, text: str | bytes) -> Evidence:
        """Parse evidence strictly.

        Raises:
            AttestationError: Not JSON, unknown kind or field, wrong field types, too large.
        """
        if len(text) > _MAX_EVIDENCE_BYTES:
            raise AttestationError(f"evidence is {len(text)} bytes, limit {_MAX_EVIDENCE_BYTES}")
        try:
            obj = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise AttestationError(f"evidence is not valid JSON: {err}") from None
        if not isinstance(obj, dict):
            raise AttestationError("evidence must be a JSON object")
        unknown = set(obj) - {"kind", "quote", "collateral", "vcek", "cert_chain"}
        if unknown:
            raise AttestationError(f"evidence has unknown fields {sorted(unknown)}")
        kind = obj.get("kind")
        if kind not in EVIDENCE_KINDS:
            raise AttestationError(f"evidence kind {kind!r} is unknown; accepted: {EVIDENCE_KINDS}")
        quote = _unb64(obj.get("quote"), "quote")
        if not quote:
            raise AttestationError("evidence has no quote")
        for name in ("collateral", "cert_chain"):
            if obj.get(name) is not None and not isinstance(obj[name], str):
                raise AttestationError(f"evidence field {name!r} must be a string")
        chain = obj.get("cert_chain")
        return cls(
            kind=kind,
            quote=quote,
            collateral=obj.get("collateral"),
            vcek=_unb64(obj.get("vcek"), "vcek"),
            cert_chain=None if chain is None else chain.encode(),
        )


@dataclass(frozen=True)
class Quote:
    """Claims read from authenticated evidence.

    Attributes:
        kind: The evidence kind.
        measurement: Hex of the code identity (simulated: SHA-256 of program and config; SGX:
            MRENCLAVE; TDX: MRTD; SEV-SNP: MEASUREMENT).
        report_data: The 64 bytes of user data bound into the quote.
        debug: Whether the TEE runs in debug mode (its memory readable by the host).
        simulated: True for simulated evidence (no hardware protection at all).
        tcb_status: DCAP TCB status (``UpToDate``...); ``None`` for SEV-SNP and simulated.
        advisory_ids: Intel security advisories that apply to the platform.
        nonce: Simulated quotes carry the client nonce in clear; else ``None``.
        timestamp: Simulated quotes carry their signing time; else ``None``.
        details: Other identity fields (MRSIGNER, RTMRs, SNP TCB...), hex or decimal strings.
    """

    kind: EvidenceKind
    measurement: str
    report_data: bytes
    debug: bool
    simulated: bool
    tcb_status: str | None = None
    advisory_ids: tuple[str, ...] = ()
    nonce: bytes | None = None
    timestamp: int | None = None
    details: dict[str, str] = field(default_factory=dict)


#: Function from a raw DCAP quote to its collateral JSON (e.g. fetched from a PCCS).
CollateralSource = Callable[[bytes], str]


def attach_collateral(evidence: Evidence, source: CollateralSource | None) -> Evidence:
    """Evidence with DCAP collateral from ``source`` attached (unchanged if not DCAP or no source).

    Raises:
        AttestationError: ``source`` failed.
    """
    if source is None or evidence.collateral or evidence.kind not in ("sgx-dcap", "tdx-dcap"):
        return evidence
    try:
        collateral = source(evidence.quote)
    except Exception as err:  # network, PCCS or parsing failures of a user-supplied source
        raise AttestationError(f"fetching DCAP collateral failed: {err}") from None
    return replace(evidence, collateral=collateral)
