"""Client end of the gRPC relay (see :mod:`shieldtune.transport.grpc_server` for the wire).

``GrpcTransport(address)`` plugs into :meth:`shieldtune.tee.client.SecureClient.connect`:
``handshake`` runs the unary ``Handshake`` RPC and keeps the session token, the first ``send``
opens the session's bidirectional stream, and each ``send`` writes one sealed record and waits
for the sealed reply. gRPC failures become :class:`~shieldtune.errors.ChannelError` naming the
status code and the server's reason.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import grpc

from shieldtune.errors import ChannelError
from shieldtune.transport.grpc_server import HANDSHAKE, SESSION, SESSION_METADATA, TOKEN_BYTES

__all__ = ["GrpcTransport"]

_END = object()


def _requests(outbox: queue.Queue[Any]) -> Iterator[bytes]:
    while True:
        item = outbox.get()
        if item is _END:
            return
        yield item


def _error(err: grpc.RpcError, what: str) -> ChannelError:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    name = code.name if code is not None else "UNKNOWN"
    return ChannelError(f"{what} failed: gRPC {name}: {details}")


class GrpcTransport:
    """One client session over gRPC.

    Args:
        address: ``host:port`` of the relay.
        max_message_bytes: Largest message sent or accepted (match the server's).
        connect_timeout_s: Time limit for the handshake (waits for the server to be ready).
        root_certificates: PEM of the CA that signed the relay's TLS certificate (e.g. the
            ``ca.pem`` of ``shieldtune certs``); None: plaintext gRPC.

    Attributes:
        bytes_sent: Record bytes sent so far (handshake excluded).
        bytes_received: Record bytes received so far.
    """

    def __init__(
        self,
        address: str,
        *,
        max_message_bytes: int = 64 << 20,
        connect_timeout_s: float = 30.0,
        root_certificates: bytes | None = None,
    ) -> None:
        self.address = address
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if root_certificates is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates)
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._handshake_rpc = self._channel.unary_unary(HANDSHAKE)
        self._session_rpc = self._channel.stream_stream(SESSION)
        self._timeout = connect_timeout_s
        self._token: bytes | None = None
        self._outbox: queue.Queue[Any] = queue.Queue()
        self._responses: Any = None
        self.bytes_sent = 0
        self.bytes_received = 0

    def handshake(self, hello: bytes) -> bytes:
        """Send the client hello; keep the session token; return the server hello.

        Raises:
            ChannelError: The server is unreachable or refused the hello.
        """
        try:
            reply = self._handshake_rpc(bytes(hello), timeout=self._timeout, wait_for_ready=True)
        except grpc.RpcError as err:
            raise _error(err, "handshake") from None
        if len(reply) <= TOKEN_BYTES:
            raise ChannelError(f"handshake reply of {len(reply)} bytes is too short")
        self._token = reply[:TOKEN_BYTES]
        return reply[TOKEN_BYTES:]

    def send(self, record: bytes) -> bytes:
        """Send one sealed record on the session's stream and return the sealed reply.

        Raises:
            ChannelError: No handshake yet, or the stream ended (refused record, oversized
                message, idle timeout, server gone).
        """
        if self._responses is None:
            if self._token is None:
                raise ChannelError("send before handshake: call handshake() first")
            self._responses = self._session_rpc(
                _requests(self._outbox), metadata=((SESSION_METADATA, self._token.hex()),)
            )
        self._outbox.put(bytes(record))
        try:
            reply = next(self._responses)
        except StopIteration:
            raise ChannelError("record failed: the server ended the session") from None
        except grpc.RpcError as err:
            raise _error(err, "record") from None
        self.bytes_sent += len(record)
        self.bytes_received += len(reply)
        return bytes(reply)

    def disconnect(self) -> None:
        """Drop the connection abruptly, as a crashing client would (tests, fault injection)."""
        if self._responses is not None:
            self._responses.cancel()
        self._channel.close()

    def close(self) -> None:
        """End the stream cleanly (the server closes the enclave session) and the channel."""
        if self._responses is not None:
            self._outbox.put(_END)
            try:
                for _ in self._responses:  # drain until the server ends the stream
                    pass
            except grpc.RpcError:
                pass
            self._responses = None
        self._channel.close()

    def __enter__(self) -> GrpcTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
