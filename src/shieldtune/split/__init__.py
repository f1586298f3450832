"""Split fine-tuning (Method 2): the per-batch step, split into what each party runs.

``step`` (the three calls both split modes share), ``protocol`` (ECALLs, wire dtypes, request
checks), ``server_program`` (the ``split-server`` enclave program), ``client`` (``SplitRemote``,
``SplitClient``), ``service`` (the host: enclave + gRPC relay, ``connect``). Only ``step`` and
``protocol`` are imported here: this ``__init__`` also runs inside the enclave, where every
loaded module must be part of the measurement, so the client and host modules stay out.
"""

from shieldtune.split.protocol import PROGRAM_NAME, WIRE_DTYPES
from shieldtune.split.step import client_backward, client_forward, server_step

__all__ = ["client_forward", "server_step", "client_backward", "PROGRAM_NAME", "WIRE_DTYPES"]
