"""Simulated quotes: an Ed25519 signature by a software platform key. NO hardware protection.

The signed body is canonical JSON (sorted keys, no spaces) and always carries
``"simulated": true``, the measurement, the 64-byte report data, the client nonce and the
signing time. Verification refuses keys the policy does not list and bodies not marked simulated.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shieldtune.crypto.channel import REPORT_DATA_BYTES
from shieldtune.errors import AttestationError
from shieldtune.tee.evidence import Evidence, Quote

__all__ = ["SIMULATED_LABEL", "sign_simulated_quote", "verify_simulated_quote"]

SIMULATED_LABEL = "SIMULATED enclave (no hardware protection)"
_SIM_FORMAT = "shieldtune-simulated-quote"
_SIM_DOMAIN = b"shieldtune simulated quote v1\n"


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_simulated_quote(
    platform_key: Ed25519PrivateKey,
    *,
    measurement: str,
    report_data: bytes,
    nonce: bytes,
    timestamp: int,
    program: str,
    debug: bool = False,
) -> Evidence:
    """Produce simulated evidence (what the simulated platform does instead of hardware).

    Args:
        platform_key: The simulated platform's Ed25519 key.
        measurement: Hex SHA-256 of the enclave program's code and config.
        report_data: The 64 bytes the enclave asked to bind.
        nonce: The client's nonce (carried in clear as well as inside the report data).
        timestamp: Signing time, seconds since the epoch.
        program: The enclave program's name (informational).
        debug: Whether the enclave was started in debug mode.

    Returns:
        Evidence of kind ``simulated``; its body always says ``"simulated": true``.
    """
    if len(report_data) != REPORT_DATA_BYTES:
        raise AttestationError(f"report data must be {REPORT_DATA_BYTES} bytes")
    body = {
        "format": _SIM_FORMAT,
        "version": 1,
        "simulated": True,
        "warning": SIMULATED_LABEL,
        "measurement": measurement,
        "report_data": report_data.hex(),
        "nonce": nonce.hex(),
        "timestamp": int(timestamp),
        "debug": bool(debug),
        "program": program,
        "platform_key": platform_key.public_key().public_bytes_raw().hex(),
    }
    signature = platform_key.sign(_SIM_DOMAIN + _canonical(body))
    quote = _canonical({"body": body, "signature": signature.hex()})
    return Evidence(kind="simulated", quote=quote)


def verify_simulated_quote(evidence: Evidence, trusted_keys: list[str]) -> Quote:
    """Authenticate a simulated quote signed by one of ``trusted_keys`` (hex Ed25519).

    Raises:
        AttestationError: Malformed, untrusted key, bad signature, or not marked simulated.
    """
    try:
        outer = json.loads(evidence.quote)
        body, sig = outer["body"], bytes.fromhex(outer["signature"])
        key_hex = body["platform_key"]
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex))
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise AttestationError(f"simulated quote is malformed: {err!r}") from None
    if key_hex not in trusted_keys:
        raise AttestationError(
            f"simulated platform key {key_hex} is not in policy.simulated_platform_keys "
            f"({trusted_keys or 'empty'}); add it to trust this machine's simulated platform"
        )
    try:
        key.verify(sig, _SIM_DOMAIN + _canonical(body))
    except InvalidSignature:
        raise AttestationError("simulated quote signature is invalid (tampered quote)") from None
    if body.get("simulated") is not True or body.get("format") != _SIM_FORMAT:
        raise AttestationError("a simulated platform key signed a quote not marked simulated")
    try:
        return Quote(
            kind="simulated",
            measurement=str(body["measurement"]).lower(),
            report_data=bytes.fromhex(body["report_data"]),
            debug=bool(body["debug"]),
            simulated=True,
            nonce=bytes.fromhex(body["nonce"]),
            timestamp=int(body["timestamp"]),
            details={"program": str(body.get("program", "")), "platform_key": key_hex},
        )
    except (ValueError, KeyError, TypeError) as err:
        raise AttestationError(f"simulated quote body is malformed: {err!r}") from None
