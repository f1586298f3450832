"""Transport: moves opaque bytes (handshake messages and sealed records); knows no models.

``grpc_server`` / ``grpc_client`` carry the attested channel of :mod:`shieldtune.crypto.channel`
over gRPC (one bidirectional stream per session); ``inproc`` relays in memory for unit tests.
"""

from shieldtune.transport.base import Relay, Transport
from shieldtune.transport.inproc import InProcTransport

__all__ = ["Relay", "Transport", "InProcTransport"]
