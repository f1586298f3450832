"""In-memory transport for unit tests: the "network" is a function call into the relay."""

from __future__ import annotations

from shieldtune.errors import ChannelError
from shieldtune.transport.base import Relay

__all__ = ["InProcTransport"]


class InProcTransport:
    """A client session relayed in memory to an enclave held by this process.

    Args:
        relay: The enclave (anything with ``open_channel`` / ``relay`` / ``close_channel``).
    """

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._session: int | None = None
        self.bytes_sent = 0
        self.bytes_received = 0

    def handshake(self, hello: bytes) -> bytes:
        """Open a channel session in the enclave; return its server hello."""
        self._session, server_hello = self._relay.open_channel(hello)
        return server_hello

    def send(self, record: bytes) -> bytes:
        """Relay one sealed record.

        Raises:
            ChannelError: No handshake yet, or the enclave refused the record.
        """
        if self._session is None:
            raise ChannelError("send before handshake: call handshake() first")
        reply = self._relay.relay(self._session, bytes(record))
        self.bytes_sent += len(record)
        self.bytes_received += len(reply)
        return reply

    def close(self) -> None:
        """Close the enclave session (idempotent)."""
        session, self._session = self._session, None
        if session is not None:
            try:
                self._relay.close_channel(session)
            except ChannelError:
                pass  # already dropped after a refused record
