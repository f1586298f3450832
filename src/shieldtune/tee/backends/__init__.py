"""Enclave backends, registered by name in :data:`shieldtune.tee.enclave.ENCLAVE_BACKENDS`.

``simulated`` (no hardware protection), ``tdx`` and ``sev-snp`` (configfs-tsm inside a
confidential VM), ``gramine-sgx`` (Intel SGX through Gramine).
"""

from shieldtune.tee.backends import gramine_sgx, simulated, tsm

__all__ = ["gramine_sgx", "simulated", "tsm"]
