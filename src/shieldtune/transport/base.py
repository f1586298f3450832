"""What a transport moves and to whom: two small protocols, bytes in and bytes out.

The server side relays to a :class:`Relay` (an enclave: ``open_channel`` / ``relay`` /
``close_channel``); the client side is a :class:`Transport` whose ``handshake`` and ``send`` plug
straight into :meth:`shieldtune.tee.client.SecureClient.connect`. Neither side ever sees a key
or a plaintext: the handshake messages are public and every record is AEAD ciphertext.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Relay", "Transport"]


class Relay(Protocol):
    """The enclave end, as the host reaches it (an :class:`~shieldtune.tee.enclave.Enclave`)."""

    def open_channel(self, hello: bytes) -> tuple[int, bytes]:
        """Relay a client hello; return the session id and the server hello."""
        ...

    def relay(self, session: int, record: bytes) -> bytes:
        """Relay one sealed record of ``session``; return the sealed reply."""
        ...

    def close_channel(self, session: int) -> None:
        """Forget ``session`` inside the enclave."""
        ...


class Transport(Protocol):
    """The client end: one attested session to one server enclave."""

    bytes_sent: int
    bytes_received: int

    def handshake(self, hello: bytes) -> bytes:
        """Send the client hello; return the server hello (with the enclave's evidence)."""
        ...

    def send(self, record: bytes) -> bytes:
        """Send one sealed record; return the sealed reply."""
        ...

    def close(self) -> None:
        """End the session (the server forgets it)."""
        ...
