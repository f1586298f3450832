"""AMD SEV-SNP attestation report verification with ``cryptography``.

Report layout (SEV-SNP ABI, ATTESTATION_REPORT, 0x4A0 bytes, little-endian)::

    0x000 VERSION u32      0x008 POLICY u64 (bit 19: DEBUG allowed)   0x034 SIGNATURE_ALGO u32
    0x038 CURRENT_TCB u64  0x050 REPORT_DATA 64  0x090 MEASUREMENT 48  0x0C0 HOST_DATA 32
    0x180 REPORTED_TCB u64 (Milan/Genoa: byte 0 boot loader, 1 TEE, 6 SNP, 7 microcode)
    0x1A0 CHIP_ID 64       0x2A0 SIGNATURE: R (72 bytes LE), S (72 bytes LE); signs 0x000..0x29F

Chain: the report is signed with ECDSA P-384 / SHA-384 by the VCEK; the VCEK certificate by the
ASK, the ASK by the ARK, the ARK by itself, all RSASSA-PSS / SHA-384 (salt 48). The ARK's key is
pinned by fingerprint. The VCEK's TCB and hardware-id extensions must match the report.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
from datetime import datetime, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from shieldtune.errors import AttestationError
from shieldtune.tee.evidence import Evidence, Quote

__all__ = ["REPORT_SIZE", "SNP_DEBUG_BIT", "SnpReport", "parse_snp_report", "verify_snp"]

REPORT_SIZE = 0x4A0
SNP_DEBUG_BIT = 1 << 19
_SIGNED = 0x2A0
_OID_TCB = {
    "bootloader": "1.3.6.1.4.1.3704.1.3.1",
    "tee": "1.3.6.1.4.1.3704.1.3.2",
    "snp": "1.3.6.1.4.1.3704.1.3.3",
    "microcode": "1.3.6.1.4.1.3704.1.3.8",
}
_OID_HWID = "1.3.6.1.4.1.3704.1.4"
_TCB_BYTE = {"bootloader": 0, "tee": 1, "snp": 6, "microcode": 7}


class SnpReport:
    """Fields of a parsed (not yet verified) SEV-SNP attestation report."""

    def __init__(self, raw: bytes) -> None:
        if len(raw) != REPORT_SIZE:
            raise AttestationError(f"SEV-SNP report is {len(raw)} bytes, expected {REPORT_SIZE}")
        self.raw = raw
        self.version, self.guest_svn, self.policy = struct.unpack_from("<IIQ", raw, 0)
        (self.vmpl, self.signature_algo) = struct.unpack_from("<II", raw, 0x30)
        self.report_data = raw[0x50:0x90]
        self.measurement = raw[0x90:0xC0]
        self.host_data = raw[0xC0:0xE0]
        self.reported_tcb = raw[0x180:0x188]
        self.chip_id = raw[0x1A0:0x1E0]
        self.signature_r = int.from_bytes(raw[_SIGNED : _SIGNED + 72], "little")
        self.signature_s = int.from_bytes(raw[_SIGNED + 72 : _SIGNED + 144], "little")

    @property
    def debug(self) -> bool:
        """Whether the guest policy allows debugging (the host can then read guest memory)."""
        return bool(self.policy & SNP_DEBUG_BIT)

    def tcb(self) -> dict[str, int]:
        """Reported TCB components (Milan/Genoa layout)."""
        return {name: self.reported_tcb[i] for name, i in _TCB_BYTE.items()}


def parse_snp_report(raw: bytes) -> SnpReport:
    """Parse the report layout (no signature check).

    Raises:
        AttestationError: Wrong size, unsupported version or signature algorithm.
    """
    report = SnpReport(raw)
    if report.version < 2:
        raise AttestationError(f"SEV-SNP report version {report.version} unsupported (need >= 2)")
    if report.signature_algo != 1:
        raise AttestationError(
            f"SEV-SNP signature algorithm {report.signature_algo} unsupported (1: ECDSA P-384)"
        )
    return report


def _load_certs(evidence: Evidence) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
    if evidence.vcek is None or evidence.cert_chain is None:
        raise AttestationError("sev-snp evidence needs the VCEK (DER) and the ASK/ARK chain (PEM)")
    try:
        with warnings.catch_warnings():  # AMD certificates carry RFC 5280-violating serials
            warnings.simplefilter("ignore")
            vcek = x509.load_der_x509_certificate(evidence.vcek)
            chain = x509.load_pem_x509_certificates(evidence.cert_chain)
    except ValueError as err:
        raise AttestationError(f"sev-snp certificates are malformed: {err}") from None
    arks = [c for c in chain if c.issuer == c.subject]
    asks = [c for c in chain if c.issuer != c.subject]
    if len(arks) != 1 or len(asks) != 1:
        raise AttestationError("sev-snp cert_chain must hold exactly one ASK and one ARK")
    return vcek, asks[0], arks[0]


def _check_pss(cert: x509.Certificate, issuer: x509.Certificate, what: str, now: datetime) -> None:
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise AttestationError(f"{what}: issuer key is not RSA")
    if not isinstance(cert.signature_hash_algorithm, hashes.SHA384):
        raise AttestationError(f"{what}: signature hash is not SHA-384")
    try:
        key.verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48),
            hashes.SHA384(),
        )
    except InvalidSignature:
        raise AttestationError(f"{what}: RSA-PSS signature is invalid") from None
    if cert.issuer != issuer.subject:
        raise AttestationError(f"{what}: issuer name does not match")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise AttestationError(
            f"{what}: certificate not valid at {now.isoformat()} (valid "
            f"{cert.not_valid_before_utc.isoformat()} .. {cert.not_valid_after_utc.isoformat()})"
        )


def _der_int(value: bytes) -> int:
    if len(value) < 3 or value[0] != 0x02 or value[1] != len(value) - 2:
        raise AttestationError("VCEK TCB extension is not a DER INTEGER")
    return int.from_bytes(value[2:], "big")


def _ext(cert: x509.Certificate, oid: str) -> bytes:
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid))
    except x509.ExtensionNotFound:
        raise AttestationError(f"VCEK lacks extension {oid}") from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise AttestationError(f"VCEK extension {oid} has an unexpected type")
    return value.value


def verify_snp(evidence: Evidence, now_s: int, ark_fingerprints: list[str]) -> Quote:
    """Verify a SEV-SNP report, its VCEK and the VCEK <- ASK <- ARK chain at ``now_s``.

    Args:
        evidence: :class:`~shieldtune.tee.attestation.Evidence` of kind ``sev-snp``.
        now_s: Verification time, seconds since the epoch.
        ark_fingerprints: Trusted ARK keys (hex SHA-256 of the DER SubjectPublicKeyInfo).

    Returns:
        The authenticated :class:`~shieldtune.tee.attestation.Quote` (policy not yet applied).

    Raises:
        AttestationError: Any failed check, naming it.
    """
    now = datetime.fromtimestamp(now_s, tz=timezone.utc)
    report = parse_snp_report(evidence.quote)
    vcek, ask, ark = _load_certs(evidence)
    spki = ark.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fingerprint = hashlib.sha256(spki).hexdigest()
    if fingerprint not in ark_fingerprints:
        raise AttestationError(
            f"ARK key {fingerprint} is not a trusted AMD root (policy.amd_ark_fingerprints)"
        )
    _check_pss(ark, ark, "ARK (self-signed)", now)
    _check_pss(ask, ark, "ASK signed by ARK", now)
    _check_pss(vcek, ask, "VCEK signed by ASK", now)
    vcek_key = vcek.public_key()
    if not isinstance(vcek_key, ec.EllipticCurvePublicKey) or vcek_key.curve.name != "secp384r1":
        raise AttestationError("VCEK key is not ECDSA P-384")
    signature = encode_dss_signature(report.signature_r, report.signature_s)
    try:
        vcek_key.verify(signature, report.raw[:_SIGNED], ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationError("SEV-SNP report signature is invalid (tampered report)") from None
    tcb = report.tcb()
    for name, oid in _OID_TCB.items():
        certified = _der_int(_ext(vcek, oid))
        if certified != tcb[name]:
            raise AttestationError(
                f"SEV-SNP reported TCB {name}={tcb[name]} differs from the VCEK's {certified}"
            )
    if _ext(vcek, _OID_HWID) != report.chip_id:
        raise AttestationError("SEV-SNP chip id differs from the VCEK's hardware id")
    details = {f"tcb_{k}": str(v) for k, v in tcb.items()}
    details.update(
        host_data=report.host_data.hex(),
        guest_policy=hex(report.policy),
        vmpl=str(report.vmpl),
        chip_id=report.chip_id.hex(),
    )
    return Quote(
        kind="sev-snp",
        measurement=report.measurement.hex(),
        report_data=report.report_data,
        debug=report.debug,
        simulated=False,
        details=details,
    )
