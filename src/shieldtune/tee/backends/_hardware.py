"""What the hardware platforms (Gramine-SGX, configfs-tsm) share: the enclave quotes itself."""

from __future__ import annotations

from collections.abc import Mapping

from shieldtune.crypto.framing import MetaValue
from shieldtune.errors import AttestationError
from shieldtune.tee.attestation import CollateralSource, Evidence, attach_collateral
from shieldtune.tee.program import measure_program

__all__ = ["SelfQuotingPlatform"]


class SelfQuotingPlatform:
    """Base of platforms whose quotes are produced inside the enclave, never by the host.

    Subclasses set ``collateral`` and ``quote_origin`` (for the error message).
    """

    collateral: CollateralSource | None
    quote_origin: str

    def measurement(self, program: str, config: Mapping[str, MetaValue]) -> str:
        """The program's SHA-256 (the quote itself attests MRENCLAVE / MRTD / MEASUREMENT)."""
        return measure_program(program, config)

    def sealing_key(self, measurement: str) -> bytes | None:
        """None: no host-provided key (Gramine's MRENCLAVE-bound key, or none in CVM guests)."""
        return None

    def host_quote(
        self, measurement: str, report_data: bytes, nonce: bytes, program: str
    ) -> Evidence:
        """Not used: the enclave quotes itself."""
        raise AttestationError(f"{self.quote_origin} quotes are produced inside the enclave")

    def complete_evidence(self, evidence: Evidence) -> Evidence:
        """Attach DCAP collateral from ``collateral`` (quote -> collateral JSON), if configured.

        Collateral is public and signed by Intel, so the untrusted host may fetch it, e.g.
        ``lambda q: asyncio.run(dcap_qvl.get_collateral(PCCS_URL, q)).to_json()``.
        """
        return attach_collateral(evidence, self.collateral)
