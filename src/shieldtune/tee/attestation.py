"""Attestation: evidence, the claims it proves, a policy, and a verifier that raises.

Evidence kinds and how each is authenticated:

=============  ==============================================================================
``simulated``  Ed25519 signature of a simulated platform key (listed in the policy) over a
               canonical JSON body that always says ``"simulated": true``. No hardware.
``sgx-dcap``   Intel SGX DCAP quote + collateral, verified by ``dcap-qvl`` (Intel root CA).
``tdx-dcap``   Intel TDX DCAP quote + collateral, verified by ``dcap-qvl``.
``sev-snp``    AMD SEV-SNP report: ECDSA P-384 signature by the VCEK; VCEK <- ASK <- ARK
               (RSA-PSS / SHA-384), ARK pinned by fingerprint (``cryptography``).
=============  ==============================================================================

:meth:`Verifier.verify` returns the verified :class:`Quote` or raises
:class:`~shieldtune.errors.AttestationError`; it never returns a bool. Checks, in order: nonce
freshness, simulated evidence allowed, signature / certificate chain / collateral at ``now``,
report data equal to the expected 64 bytes, measurement in the allow-list, other identity claims
in theirs (``allowed_claims``: TDX RTMRs, SEV-SNP HOST_DATA, SGX MRSIGNER...), debug off, TCB
status.
"""

from __future__ import annotations

import hmac
import logging
import os
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shieldtune.crypto.channel import ClientHello, report_data
from shieldtune.errors import AttestationError, ConfigError
from shieldtune.tee.dcap import verify_dcap
from shieldtune.tee.evidence import (
    EVIDENCE_KINDS,
    CollateralSource,
    Evidence,
    EvidenceKind,
    Quote,
    attach_collateral,
    unix_time,
)
from shieldtune.tee.simquote import sign_simulated_quote, verify_simulated_quote
from shieldtune.tee.snp import verify_snp

__all__ = [
    "EvidenceKind",
    "EVIDENCE_KINDS",
    "Evidence",
    "Quote",
    "SnpTcb",
    "CLAIMS",
    "Policy",
    "NonceRegistry",
    "Verifier",
    "AMD_ARK_FINGERPRINTS",
    "sign_simulated_quote",
    "unix_time",
    "attach_collateral",
    "CollateralSource",
]

log = logging.getLogger("shieldtune.tee")

#: SHA-256 of the DER SubjectPublicKeyInfo of AMD root keys (ARK) trusted for SEV-SNP by default.
#: ARK-Milan as served by AMD KDS (kdsintf.amd.com/vcek/v1/Milan/cert_chain); add other product
#: lines (Genoa, Turin...) through ``Policy.amd_ark_fingerprints``.
AMD_ARK_FINGERPRINTS: dict[str, str] = {
    "Milan": "9f056bee44377e29308cb5ffa895bdfb62d18881fa6bed8d6f075b0204089cb9",
}


def _hex_list(values: list[str], name: str, length: int | None = None) -> list[str]:
    out = []
    for value in values:
        v = value.strip().lower()
        try:
            raw = bytes.fromhex(v)
        except ValueError:
            raise ValueError(f"{name} entry {value!r} is not hex") from None
        if length is not None and len(raw) != length:
            raise ValueError(f"{name} entry {value!r} must be {length} bytes of hex")
        out.append(v)
    return out


#: Identity claims a policy may pin besides the measurement (``Policy.allowed_claims``), by the
#: evidence kind that reports each; hex unless listed in ``_DECIMAL_CLAIMS``.
CLAIMS: dict[str, str] = {
    "mr_signer": "sgx-dcap",  # hash of the key that signed the enclave
    "isv_prod_id": "sgx-dcap",
    "rt_mr0": "tdx-dcap",  # firmware configuration (TDVF, ACPI tables)
    "rt_mr1": "tdx-dcap",  # OS loader and kernel
    "rt_mr2": "tdx-dcap",  # kernel command line, initrd
    "rt_mr3": "tdx-dcap",  # runtime extensions (guest-defined)
    "mr_config_id": "tdx-dcap",
    "mr_owner": "tdx-dcap",
    "mr_seam": "tdx-dcap",  # the TDX module
    "host_data": "sev-snp",  # 32 bytes the host fixes at launch
    "vmpl": "sev-snp",
}
_DECIMAL_CLAIMS = frozenset({"isv_prod_id", "vmpl"})


def _claim_values(name: str, values: list[str]) -> list[str]:
    if name not in CLAIMS:
        raise ValueError(f"allowed_claims: unknown claim {name!r}; known: {sorted(CLAIMS)}")
    if not values:
        raise ValueError(f"allowed_claims.{name} is empty (it would accept nothing); remove it")
    if name in _DECIMAL_CLAIMS:
        if not all(v.strip().isdigit() for v in values):
            raise ValueError(f"allowed_claims.{name} entries must be decimal, got {values!r}")
        return [str(int(v)) for v in values]
    return _hex_list(values, f"allowed_claims.{name}")


class SnpTcb(BaseModel):
    """Minimum SEV-SNP TCB component versions (security patch levels)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bootloader: int = 0
    tee: int = 0
    snp: int = 0
    microcode: int = 0


class Policy(BaseModel):
    """What a verifier accepts. The defaults are strict: hardware only, no debug, UpToDate TCB.

    Attributes:
        allowed_measurements: Hex measurements accepted (empty: accept none).
        allow_simulated: Accept simulated evidence (no hardware protection). Off by default.
        simulated_platform_keys: Hex Ed25519 public keys of simulated platforms to trust.
        allow_debug: Accept TEEs in debug mode. Off by default.
        accepted_tcb_statuses: DCAP TCB statuses accepted for SGX / TDX.
        max_nonce_age_s: A nonce older than this (since issue) is stale.
        max_quote_age_s: A simulated quote signed longer ago than this is stale.
        allowed_claims: Identity claims besides the measurement, each with its accepted values
            (names in :data:`CLAIMS`: TDX ``rt_mr0``..``rt_mr3``, SEV-SNP ``host_data``, SGX
            ``mr_signer``...). A quote that does not report a named claim is refused.
        min_snp_tcb: Minimum SEV-SNP reported TCB, if any.
        amd_ark_fingerprints: Trusted AMD root keys (SHA-256 of their SubjectPublicKeyInfo).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_measurements: list[str] = Field(default_factory=list)
    allow_simulated: bool = False
    simulated_platform_keys: list[str] = Field(default_factory=list)
    allow_debug: bool = False
    accepted_tcb_statuses: list[str] = Field(default_factory=lambda: ["UpToDate"])
    max_nonce_age_s: int = Field(default=300, gt=0)
    max_quote_age_s: int = Field(default=300, gt=0)
    allowed_claims: dict[str, list[str]] = Field(default_factory=dict)
    min_snp_tcb: SnpTcb | None = None
    amd_ark_fingerprints: list[str] = Field(
        default_factory=lambda: list(AMD_ARK_FINGERPRINTS.values())
    )

    @field_validator("allowed_measurements")
    @classmethod
    def _measurements_hex(cls, v: list[str]) -> list[str]:
        return _hex_list(v, "allowed_measurements")

    @field_validator("allowed_claims")
    @classmethod
    def _claims(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        return {name: _claim_values(name, values) for name, values in v.items()}

    @field_validator("simulated_platform_keys")
    @classmethod
    def _keys_hex(cls, v: list[str]) -> list[str]:
        return _hex_list(v, "simulated_platform_keys", 32)

    @field_validator("amd_ark_fingerprints")
    @classmethod
    def _ark_hex(cls, v: list[str]) -> list[str]:
        return _hex_list(v, "amd_ark_fingerprints", 32)

    @classmethod
    def load(cls, path: Path) -> Policy:
        """Load a policy from a YAML or JSON file.

        Raises:
            ConfigError: Unreadable file, unknown keys or bad values (all problems listed).
        """
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"policy file {path}: {err.strerror}") from None
        try:
            import yaml  # type: ignore[import-untyped,unused-ignore]

            data = yaml.safe_load(text)
        except Exception as err:  # yaml.YAMLError and friends
            raise ConfigError(f"policy file {path} is not valid YAML/JSON: {err}") from None
        return cls.from_dict(data if data is not None else {}, source=str(path))

    @classmethod
    def from_dict(cls, data: object, source: str = "policy") -> Policy:
        """Validate a mapping into a policy.

        Raises:
            ConfigError: Unknown keys or bad values, one line per problem.
        """
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            problems = [
                f"{source}: {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" else "")
                + (
                    "; YAML reads unquoted all-digit hex as a number: quote it"
                    if e["type"] == "string_type" and isinstance(e["input"], int)
                    else ""
                )
                for e in err.errors()
            ]
            raise ConfigError(problems) from None


class NonceRegistry:
    """Verifier-side nonce book-keeping: issue, then consume once while fresh.

    Args:
        max_age_s: Nonces older than this are refused as stale.
    """

    def __init__(self, max_age_s: int = 300) -> None:
        self.max_age_s = max_age_s
        self._issued: dict[bytes, int] = {}

    def issue(self, now: datetime | float | None = None) -> bytes:
        """Return a fresh 32-byte nonce from the OS CSPRNG and remember when it was issued."""
        t = unix_time(now)
        self._issued = {n: ts for n, ts in self._issued.items() if t - ts <= self.max_age_s}
        nonce = os.urandom(32)
        self._issued[nonce] = t
        return nonce

    def consume(self, nonce: bytes, now: datetime | float | None = None) -> None:
        """Accept ``nonce`` once.

        Raises:
            AttestationError: Unknown (never issued, or already used) or stale nonce.
        """
        issued = self._issued.pop(nonce, None)
        if issued is None:
            raise AttestationError(
                "nonce was not issued by this verifier or was already used: stale or replayed "
                "evidence; start a new handshake"
            )
        age = unix_time(now) - issued
        if age > self.max_age_s:
            raise AttestationError(
                f"nonce is stale: issued {age} s ago, policy max_nonce_age_s={self.max_age_s}"
            )


class Verifier:
    """Checks evidence against a :class:`Policy`; raises on any failure.

    Args:
        policy: What to accept.
        nonces: Nonce registry for freshness; a new one (with the policy's max age) by default.
    """

    def __init__(self, policy: Policy, nonces: NonceRegistry | None = None) -> None:
        self.policy = policy
        self.nonces = nonces or NonceRegistry(policy.max_nonce_age_s)

    def issue_nonce(self, now: datetime | float | None = None) -> bytes:
        """A fresh nonce for a client hello, remembered for :meth:`verify`."""
        return self.nonces.issue(now)

    def authenticate(self, evidence: Evidence, now: datetime | float | None = None) -> Quote:
        """Check the evidence's signature, certificate chain and collateral at ``now``.

        This does no policy check beyond "simulated allowed"; use :meth:`verify`.

        Raises:
            AttestationError: Simulated evidence under a strict policy, or failed authentication.
        """
        if evidence.kind == "simulated":
            if not self.policy.allow_simulated:
                raise AttestationError(
                    "evidence comes from a SIMULATED enclave (no hardware protection) and "
                    "policy.allow_simulated is false; set allow_simulated: true only for "
                    "development and testing"
                )
            return verify_simulated_quote(evidence, self.policy.simulated_platform_keys)
        if evidence.kind in ("sgx-dcap", "tdx-dcap"):
            return verify_dcap(evidence, unix_time(now))
        if evidence.kind == "sev-snp":
            return verify_snp(evidence, unix_time(now), self.policy.amd_ark_fingerprints)
        raise AttestationError(
            f"evidence kind {evidence.kind!r} unknown; accepted {EVIDENCE_KINDS}"
        )

    def verify(
        self,
        evidence: Evidence,
        *,
        expected_report_data: bytes,
        nonce: bytes | None = None,
        now: datetime | float | None = None,
    ) -> Quote:
        """Verify evidence completely.

        Args:
            evidence: The evidence received.
            expected_report_data: The 64 bytes the quote must carry (see
                :func:`~shieldtune.crypto.channel.report_data`).
            nonce: The nonce this verifier issued for this handshake; consumed (once, fresh).
                ``None`` skips nonce freshness (only for offline audits of stored evidence).
            now: Verification time (aware datetime or epoch seconds); default: now.

        Returns:
            The verified claims.

        Raises:
            AttestationError: The first check that failed, naming the field, the value and what
                the policy accepts.
        """
        t = unix_time(now)
        if nonce is not None:
            self.nonces.consume(nonce, t)
        quote = self.authenticate(evidence, t)
        if quote.simulated:
            self._check_simulated_freshness(quote, nonce, t)
        if not hmac.compare_digest(quote.report_data, expected_report_data):
            raise AttestationError(
                f"report data {quote.report_data.hex()[:16]}... does not match the expected "
                f"{expected_report_data.hex()[:16]}...: the quote binds another key or nonce"
            )
        self.check_policy(quote)
        if quote.simulated:
            log.warning(
                "accepted a SIMULATED enclave quote (no hardware protection) because "
                "policy.allow_simulated is true"
            )
        return quote

    def verify_channel(
        self,
        evidence: Evidence,
        *,
        hello: ClientHello,
        enclave_public: bytes,
        now: datetime | float | None = None,
    ) -> Quote:
        """Verify the evidence of a channel handshake: report data = SHA-512(E || n || C).

        ``hello.nonce`` must have come from :meth:`issue_nonce`.
        """
        expected = report_data(enclave_public, hello.nonce, hello.client_public)
        return self.verify(evidence, expected_report_data=expected, nonce=hello.nonce, now=now)

    def _check_simulated_freshness(self, quote: Quote, nonce: bytes | None, t: int) -> None:
        if nonce is not None and quote.nonce != nonce:
            raise AttestationError("simulated quote carries another nonce: stale or replayed quote")
        age = t - (quote.timestamp or 0)
        if age > self.policy.max_quote_age_s or age < -60:
            raise AttestationError(
                f"simulated quote timestamp is {age} s old; policy max_quote_age_s="
                f"{self.policy.max_quote_age_s}"
            )

    def check_policy(self, quote: Quote) -> None:
        """Check authenticated claims against the policy: measurement, other claims, debug, TCB.

        :meth:`verify` calls this; call it directly only for offline audits of stored evidence
        (no report-data binding, no freshness).

        Raises:
            AttestationError: The first claim the policy refuses.
        """
        p = self.policy
        if quote.measurement not in p.allowed_measurements:
            raise AttestationError(
                f"measurement {quote.measurement} ({quote.kind}) is not in "
                f"policy.allowed_measurements {p.allowed_measurements or '(empty)'}; add it if "
                "you trust this enclave build"
            )
        for name, accepted in p.allowed_claims.items():
            have = quote.details.get(name)
            if have is None:
                raise AttestationError(
                    f"{quote.kind} evidence does not report {name}, which policy.allowed_claims "
                    f"pins (reported by {CLAIMS[name]} evidence)"
                )
            if have.lower() not in accepted:
                raise AttestationError(
                    f"{quote.kind} claim {name}={have} is not in policy.allowed_claims.{name} "
                    f"{accepted}"
                )
        if quote.debug and not p.allow_debug:
            raise AttestationError(
                f"{quote.kind} TEE runs in DEBUG mode (the host can read its memory) and "
                "policy.allow_debug is false"
            )
        if quote.tcb_status is not None and quote.tcb_status not in p.accepted_tcb_statuses:
            raise AttestationError(
                f"TCB status {quote.tcb_status} (advisories {list(quote.advisory_ids)}) is not in "
                f"policy.accepted_tcb_statuses {p.accepted_tcb_statuses}"
            )
        if quote.kind == "sev-snp" and p.min_snp_tcb is not None:
            for part, minimum in p.min_snp_tcb.model_dump().items():
                have = int(quote.details[f"tcb_{part}"])
                if have < minimum:
                    raise AttestationError(
                        f"SEV-SNP reported TCB {part}={have} is below policy.min_snp_tcb."
                        f"{part}={minimum}"
                    )
