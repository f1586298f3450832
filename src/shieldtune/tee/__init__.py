"""Trusted execution: enclaves, attestation, sealing and the boundary audit log.

The default backend is a *simulation* (an ordinary OS process with a software signing key): it
gives no hardware protection and says so in every quote and log line. Real-hardware backends
(Gramine/SGX, TDX and SEV-SNP through configfs-tsm) produce evidence verified by
:class:`~shieldtune.tee.attestation.Verifier`.
"""

__all__: list[str] = []
