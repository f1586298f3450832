"""Enclave program ``fedavg-sparse``: the ``fedavg`` ECALLs for split clients' SPF deltas.

The same code as :mod:`~shieldtune.federated.enclave_program` (which branches on the program's
name); a program of its own because its measurement must include the SPF delta code it runs
(and, through the adapter package, the model code), while the dense ``fedavg`` program stays
free of model code. Its config adds ``dp_clip`` and ``dp_sigma``.
"""

from __future__ import annotations

from shieldtune.federated.enclave_program import PROGRAM as DENSE
from shieldtune.federated.enclave_program import SPARSE_NAME
from shieldtune.tee.program import EnclaveProgram

__all__ = ["PROGRAM"]

PROGRAM = EnclaveProgram(SPARSE_NAME)
for _name, _fn in DENSE.ecalls.items():
    _host, _channel = DENSE.ways[_name]
    PROGRAM.ecall(_name, host=_host, channel=_channel)(_fn)
