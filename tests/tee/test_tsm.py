"""configfs-tsm (TDX / SEV-SNP) against a fake kernel tree in a temporary folder."""

from __future__ import annotations

import shutil
import struct
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from shieldtune.errors import AttestationError
from shieldtune.tee.attestation import Policy, Verifier
from shieldtune.tee.backends.tsm import (
    TsmFs,
    TsmReport,
    evidence_from_tsm,
    parse_snp_cert_table,
    tsm_report,
)

VECTOR_TIME = datetime(2025, 7, 1, tzinfo=timezone.utc)
SNP_MEASUREMENT = (
    "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d"
    "3e1a0dc39b2c60bd95b9c480cd81841f"
)


class FakeKernel(TsmFs):
    """Emulates the configfs-tsm attributes the kernel creates, with real files."""

    def __init__(
        self,
        provider: str = "tdx_guest",
        outblob=None,
        auxblob: bytes | None = None,
        races: int = 0,
    ) -> None:
        self.provider = provider
        self.outblob = outblob or (lambda inblob: b"TDX-QUOTE:" + inblob)
        self.auxblob = auxblob
        self.races = races
        self.mkdirs = 0

    def mkdir(self, path: Path) -> None:
        path.mkdir()
        self.mkdirs += 1
        (path / "provider").write_text(self.provider + "\n")
        (path / "generation").write_text("0\n")
        if self.auxblob is not None:
            (path / "auxblob").write_bytes(self.auxblob)

    def rmdir(self, path: Path) -> None:
        shutil.rmtree(path)

    def _bump(self, path: Path) -> None:
        gen = path.parent / "generation"
        gen.write_text(f"{int(gen.read_text()) + 1}\n")

    def write(self, path: Path, data: bytes) -> None:
        path.write_bytes(data)
        self._bump(path)
        if path.name == "inblob":
            (path.parent / "outblob").write_bytes(self.outblob(data))

    def read(self, path: Path) -> bytes:
        if path.name == "outblob" and self.races > 0:
            self.races -= 1
            self._bump(path)  # another process wrote inblob meanwhile
        return path.read_bytes()


def test_tdx_quote_through_configfs(tmp_path: Path) -> None:
    # Prepare
    kernel = FakeKernel()
    rd = bytes(range(64))
    # Execute
    report = tsm_report(rd, tmp_path, kernel)
    evidence = evidence_from_tsm(report)
    # Assert
    assert report.provider == "tdx_guest" and report.outblob == b"TDX-QUOTE:" + rd
    assert report.generation == 1
    assert evidence.kind == "tdx-dcap" and evidence.collateral is None
    assert list(tmp_path.iterdir()) == []  # the report directory was removed


def test_generation_race_is_detected_and_retried(tmp_path: Path) -> None:
    kernel = FakeKernel(races=1)
    report = tsm_report(b"\x01" * 64, tmp_path, kernel, retries=3)
    assert kernel.mkdirs == 2 and report.outblob.endswith(b"\x01" * 64)


def test_persistent_generation_race_is_refused(tmp_path: Path) -> None:
    kernel = FakeKernel(races=10)
    with pytest.raises(AttestationError, match=r"rewritten by another process.*0 -> 2"):
        tsm_report(b"\x01" * 64, tmp_path, kernel, retries=3)
    assert list(tmp_path.iterdir()) == []


def test_outside_a_confidential_vm_and_bad_report_data(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="not inside a TDX / SEV-SNP guest"):
        tsm_report(b"\x00" * 64, tmp_path / "missing", FakeKernel())
    with pytest.raises(AttestationError, match="64 bytes"):
        tsm_report(b"\x00" * 63, tmp_path, FakeKernel())


def _cert_table(entries: dict[str, bytes]) -> bytes:
    header_len = 24 * (len(entries) + 1)
    header, body = b"", b""
    for guid, der in entries.items():
        header += uuid.UUID(guid).bytes_le + struct.pack("<II", header_len + len(body), len(der))
        body += der
    return header + b"\x00" * 24 + body


def test_sev_snp_report_and_certificates_from_configfs_verify(
    tmp_path: Path, attestation_dir: Path
) -> None:
    # Prepare: the genuine Milan report and its certificates, served by the fake kernel
    report = bytes.fromhex((attestation_dir / "snp/report_milan.hex").read_text().strip())
    vcek = (attestation_dir / "snp/vcek_milan.der").read_bytes()
    ask, ark = x509.load_pem_x509_certificates(
        (attestation_dir / "snp/cert_chain_milan").read_bytes()
    )
    aux = _cert_table(
        {
            "63da758d-e664-4564-adc5-f4b93be8accd": vcek,
            "4ab7b379-bbac-4fe4-a02f-05aef327c782": ask.public_bytes(Encoding.DER),
            "c0b406a4-a803-4952-9743-3fb6014cd0ae": ark.public_bytes(Encoding.DER),
        }
    )
    kernel = FakeKernel("sev_guest", outblob=lambda _: report, auxblob=aux)
    # Execute
    evidence = evidence_from_tsm(tsm_report(report[0x50:0x90], tmp_path, kernel))
    quote = Verifier(Policy(allowed_measurements=[SNP_MEASUREMENT])).verify(
        evidence, expected_report_data=report[0x50:0x90], now=VECTOR_TIME
    )
    # Assert
    assert evidence.kind == "sev-snp" and evidence.vcek == vcek
    assert quote.measurement == SNP_MEASUREMENT


def test_unknown_provider_and_malformed_cert_table_are_refused() -> None:
    with pytest.raises(AttestationError, match="provider 'arm_cca_guest' unsupported"):
        evidence_from_tsm(TsmReport("arm_cca_guest", b"x", None, 1))
    with pytest.raises(AttestationError, match="not terminated"):
        parse_snp_cert_table(bytes(20))  # shorter than one entry, no terminator
    bad = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes_le + struct.pack("<II", 48, 999)
    with pytest.raises(AttestationError, match="points past"):
        parse_snp_cert_table(bad + b"\x00" * 24)
