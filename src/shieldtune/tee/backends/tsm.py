"""TDX and SEV-SNP confidential VMs through Linux configfs-tsm.

Inside a TDX or SEV-SNP guest (Linux >= 6.7), ``/sys/kernel/config/tsm/report`` hands out quotes::

    mkdir  report/<name>            the kernel creates the attributes below
    write  report/<name>/inblob     64 bytes of report data
    read   report/<name>/outblob    the TDX quote / SEV-SNP attestation report
    read   report/<name>/auxblob    SEV-SNP: the certificate table (VCEK, ASK, ARK), if provided
    read   report/<name>/provider   "tdx_guest" or "sev_guest"
    read   report/<name>/generation incremented on every write to the directory
    rmdir  report/<name>

Another process writing the same directory between our ``inblob`` write and ``outblob`` read
would hand us a quote over *its* report data; the generation counter detects that (it must be
exactly one more after our write than before it), and the request is retried.

The enclave program runs as a process inside the confidential VM: the whole VM is the TEE, so the
quote's measurement is the VM's (MRTD / MEASUREMENT), not the program's hash. See
docs/security-model.md.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from shieldtune.crypto.framing import MetaValue
from shieldtune.errors import AttestationError, SealingError
from shieldtune.tee.attestation import CollateralSource, Evidence
from shieldtune.tee.backends._hardware import SelfQuotingPlatform
from shieldtune.tee.enclave import ENCLAVE_BACKENDS
from shieldtune.tee.process import ProcessEnclave
from shieldtune.tee.sealing import FileCounter

__all__ = [
    "TSM_REPORT_ROOT",
    "TsmFs",
    "TsmReport",
    "tsm_report",
    "parse_snp_cert_table",
    "evidence_from_tsm",
    "enclave_quote",
    "TsmPlatform",
    "tsm_enclave",
]

TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
_PROVIDERS = {"tdx_guest": "tdx-dcap", "sev_guest": "sev-snp"}
_SNP_GUIDS = {
    "63da758d-e664-4564-adc5-f4b93be8accd": "vcek",
    "4ab7b379-bbac-4fe4-a02f-05aef327c782": "ask",
    "c0b406a4-a803-4952-9743-3fb6014cd0ae": "ark",
}


class TsmFs:
    """File operations on the configfs tree (tests substitute a fake kernel)."""

    def mkdir(self, path: Path) -> None:
        """Create a report directory."""
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        """Remove a report directory."""
        os.rmdir(path)

    def read(self, path: Path) -> bytes:
        """Read an attribute."""
        return path.read_bytes()

    def write(self, path: Path, data: bytes) -> None:
        """Write an attribute."""
        path.write_bytes(data)


class TsmReport:
    """What one configfs-tsm request returned."""

    def __init__(self, provider: str, outblob: bytes, auxblob: bytes | None, generation: int):
        self.provider = provider
        self.outblob = outblob
        self.auxblob = auxblob
        self.generation = generation


def _read_int(fs: TsmFs, path: Path) -> int:
    try:
        return int(fs.read(path).decode().strip())
    except ValueError:
        raise AttestationError(f"configfs-tsm {path} does not hold an integer") from None


def tsm_report(
    report_data: bytes, root: Path = TSM_REPORT_ROOT, fs: TsmFs | None = None, retries: int = 3
) -> TsmReport:
    """Ask the TEE for a report over ``report_data`` through configfs-tsm.

    Args:
        report_data: Exactly 64 bytes.
        root: The ``tsm/report`` directory.
        fs: File operations (a fake in tests).
        retries: Attempts when another writer races us.

    Returns:
        The provider, quote / report bytes, auxiliary blob and generation.

    Raises:
        AttestationError: Not in a confidential VM, bad report data, or the generation race
            persisted over every attempt.
    """
    fs = fs or TsmFs()
    root = Path(root)
    if len(report_data) != 64:
        raise AttestationError(f"report data must be 64 bytes, got {len(report_data)}")
    if not root.is_dir():
        raise AttestationError(
            f"{root} does not exist: not inside a TDX / SEV-SNP guest with configfs-tsm "
            "(Linux >= 6.7, configfs mounted at /sys/kernel/config)"
        )
    last = ""
    for _ in range(max(1, retries)):
        path = root / f"shieldtune-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        fs.mkdir(path)
        try:
            before = _read_int(fs, path / "generation")
            fs.write(path / "inblob", report_data)
            outblob = fs.read(path / "outblob")
            after = _read_int(fs, path / "generation")
            if after != before + 1:
                last = f"generation went {before} -> {after}, expected {before + 1}"
                continue
            provider = fs.read(path / "provider").decode().strip()
            aux = fs.read(path / "auxblob") if (path / "auxblob").exists() else None
            return TsmReport(provider, outblob, aux or None, after)
        finally:
            fs.rmdir(path)
    raise AttestationError(
        f"configfs-tsm report was rewritten by another process during our request ({last}) "
        f"in all {retries} attempts; the quote may not cover our report data"
    )


def parse_snp_cert_table(aux: bytes) -> dict[str, bytes]:
    """Split the SEV-SNP certificate table (GUID, offset, length entries) into DER certificates.

    Returns:
        ``{"vcek": der, "ask": der, "ark": der}`` for the entries present.

    Raises:
        AttestationError: A malformed table.
    """
    out: dict[str, bytes] = {}
    pos = 0
    while True:
        if pos + 24 > len(aux):
            raise AttestationError("SEV-SNP certificate table is not terminated")
        guid = str(uuid.UUID(bytes_le=aux[pos : pos + 16]))
        offset = int.from_bytes(aux[pos + 16 : pos + 20], "little")
        length = int.from_bytes(aux[pos + 20 : pos + 24], "little")
        if guid == "00000000-0000-0000-0000-000000000000" and offset == 0 and length == 0:
            return out
        if offset + length > len(aux):
            raise AttestationError(f"SEV-SNP certificate entry {guid} points past the table")
        if guid in _SNP_GUIDS:
            out[_SNP_GUIDS[guid]] = aux[offset : offset + length]
        pos += 24


def evidence_from_tsm(report: TsmReport) -> Evidence:
    """Turn a configfs-tsm report into :class:`~shieldtune.tee.attestation.Evidence`.

    TDX quotes need DCAP collateral attached before verification; SEV-SNP reports carry the
    VCEK / ASK / ARK when the host provisioned them in ``auxblob``.

    Raises:
        AttestationError: Unknown provider or unreadable certificates.
    """
    kind = _PROVIDERS.get(report.provider)
    if kind is None:
        raise AttestationError(
            f"configfs-tsm provider {report.provider!r} unsupported; accepted {sorted(_PROVIDERS)}"
        )
    if kind == "tdx-dcap":
        return Evidence(kind="tdx-dcap", quote=report.outblob)
    certs = parse_snp_cert_table(report.auxblob) if report.auxblob else {}
    chain = None
    if "ask" in certs and "ark" in certs:
        try:
            pems = [
                x509.load_der_x509_certificate(certs[k]).public_bytes(Encoding.PEM)
                for k in ("ask", "ark")
            ]
        except ValueError as err:
            raise AttestationError(f"SEV-SNP auxblob certificate unreadable: {err}") from None
        chain = b"".join(pems)
    return Evidence(kind="sev-snp", quote=report.outblob, vcek=certs.get("vcek"), cert_chain=chain)


def enclave_quote(report_data: bytes, root: str) -> Evidence:
    """In-enclave quote provider used by the runtime (``quote_source == "tsm"``)."""
    return evidence_from_tsm(tsm_report(report_data, Path(root) if root else TSM_REPORT_ROOT))


class TsmPlatform(SelfQuotingPlatform):
    """A process inside a TDX / SEV-SNP guest; quotes come from configfs-tsm inside it.

    Args:
        name: ``tdx`` or ``sev-snp`` (informational; the provider file decides the kind).
        root: configfs-tsm report directory.
        state_dir: Where counters for sealed files live.
        collateral: Fetches DCAP collateral for TDX quotes (attached before they leave the host).
    """

    simulated = False
    quote_origin = "configfs-tsm"
    quote_source = "tsm"
    sealing = "none"  # no hardware sealing key in TDX / SEV-SNP guests: use a key broker

    def __init__(
        self,
        name: str = "tdx",
        root: Path = TSM_REPORT_ROOT,
        state_dir: Path | None = None,
        collateral: CollateralSource | None = None,
    ) -> None:
        self.name = name
        self.attestation_root = str(root)
        self.collateral = collateral
        self.state_dir = state_dir or Path.home() / ".cache" / "shieldtune" / "tsm"

    def command(self, program: str) -> list[str]:
        """``python -m shieldtune.tee.runtime`` inside the guest."""
        return [sys.executable, "-m", "shieldtune.tee.runtime"]

    def counter(self, measurement: str, path: Path) -> FileCounter:
        """Counter file (sealing is refused on this backend anyway)."""
        raise SealingError("sealing needs a key broker on TDX / SEV-SNP; not available")


def tsm_enclave(
    program: str,
    config: Mapping[str, MetaValue] | None = None,
    *,
    kind: str = "tdx",
    root: Path = TSM_REPORT_ROOT,
    state_dir: Path | None = None,
    collateral: CollateralSource | None = None,
    **kwargs: Any,
) -> ProcessEnclave:
    """An enclave process inside a TDX / SEV-SNP guest (not started)."""
    platform = TsmPlatform(kind, root, state_dir, collateral)
    return ProcessEnclave(program, config, platform=platform, **kwargs)


def _tdx(program: str, config: Mapping[str, MetaValue] | None = None, **kw: Any) -> ProcessEnclave:
    return tsm_enclave(program, config, kind="tdx", **kw)


def _snp(program: str, config: Mapping[str, MetaValue] | None = None, **kw: Any) -> ProcessEnclave:
    return tsm_enclave(program, config, kind="sev-snp", **kw)


ENCLAVE_BACKENDS.register("tdx", _tdx)
ENCLAVE_BACKENDS.register("sev-snp", _snp)
