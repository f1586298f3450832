"""gRPC relay of the attested channel: one ``Handshake`` RPC, one ``Session`` stream per client.

The host runs this server; it owns no key and never decrypts. It forwards the client hello to the
enclave and the server hello back, then relays each sealed record of a session's stream to
``relay.relay(session, record)`` and streams the sealed reply back::

    /shieldtune.split.v1.SplitRelay/Handshake   unary    client hello (70 bytes)
                                                         -> token (16 bytes) || server hello
    /shieldtune.split.v1.SplitRelay/Session     bidi     metadata x-shieldtune-session: token hex
                                                         record i -> reply i (AEAD ciphertext)

Why raw bytes and no protobuf: both messages already are self-describing, versioned,
length-checked binary formats (``crypto/channel.py`` hellos and records; inside them the
``crypto/framing.py`` frame), and the record is authenticated end to end. A protobuf wrapper
would add a schema with one ``bytes`` field, a second parser on the host's attack surface, a
copy of every activation tensor and generated code to keep in sync, and no information. So the
service is registered with ``grpc.method_handlers_generic_handler`` and identity
(de)serialisers; the two method names and the metadata key below are the whole contract.

Limits and faults, each confined to its own session: ``max_message_bytes`` (gRPC refuses a
larger message with RESOURCE_EXHAUSTED), ``idle_timeout_s`` between records (DEADLINE_EXCEEDED),
``handshake_timeout_s`` for a token that never starts its stream, ``max_sessions`` (handshakes
beyond it get RESOURCE_EXHAUSTED). A record the enclave refuses (tampered, replayed, malformed)
ends that stream with INVALID_ARGUMENT; the enclave drops that session and serves the others.
Whenever a stream ends (done, refused, timed out, client gone) its enclave session is closed.

Across machines the port can be served over TLS (``tls=(certificate PEM, private key PEM)``,
e.g. from ``shieldtune certs``): the records are sealed end to end either way; TLS also hides
the metadata (sizes and timing are still visible, who talks to whom is not). The relay counts
the bytes it relays and how each stream ended (:attr:`RelayServer.outcomes`: ``finished`` when
the client closed it, ``dropped`` otherwise), so a host can wait for its clients
(:meth:`RelayServer.wait_streams`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from shieldtune.errors import ChannelError, ShieldtuneError
from shieldtune.transport.base import Relay

__all__ = [
    "SERVICE",
    "HANDSHAKE",
    "SESSION",
    "SESSION_METADATA",
    "TOKEN_BYTES",
    "RelayLimits",
    "RelayServer",
]

log = logging.getLogger("shieldtune.transport")

SERVICE = "shieldtune.split.v1.SplitRelay"
HANDSHAKE = f"/{SERVICE}/Handshake"
SESSION = f"/{SERVICE}/Session"
SESSION_METADATA = "x-shieldtune-session"
TOKEN_BYTES = 16
_END = object()  # the client closed its stream
_BROKEN = object()  # the stream ended any other way (cancelled, connection lost, too large)


@dataclass(frozen=True)
class RelayLimits:
    """Per-session limits of the relay.

    Attributes:
        max_message_bytes: Largest gRPC message either way.
        idle_timeout_s: Longest wait for a session's next record.
        handshake_timeout_s: Longest wait between a handshake and the start of its stream.
        max_sessions: Most sessions open at once.
    """

    max_message_bytes: int = 64 << 20
    idle_timeout_s: float = 120.0
    handshake_timeout_s: float = 60.0
    max_sessions: int = 16


@dataclass
class _Session:
    sid: int
    opened: float
    streaming: bool = False


class RelayServer:
    """The host's gRPC server in front of an enclave.

    Args:
        relay: The enclave end (``open_channel`` / ``relay`` / ``close_channel``).
        host: Interface to bind (``127.0.0.1`` by default: loopback only).
        port: TCP port; 0 picks a free one (see :attr:`address`).
        limits: Per-session limits.
        interceptors: gRPC server interceptors (e.g. to capture traffic in tests).
        tls: ``(certificate chain PEM, private key PEM)`` to serve TLS; None: plaintext gRPC.

    Attributes:
        bytes_in: Record bytes received from clients (handshakes excluded).
        bytes_out: Record bytes sent back.
        outcomes: How each session stream ended, in order: ``finished`` (the client closed it)
            or ``dropped`` (refused, timed out, cancelled, connection lost).
    """

    def __init__(
        self,
        relay: Relay,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: RelayLimits | None = None,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
        tls: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.relay = relay
        self.host, self.port = host, port
        self.limits = limits or RelayLimits()
        self.tls = tls
        self._interceptors = list(interceptors)
        self._sessions: dict[bytes, _Session] = {}
        self._opening = 0
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)
        self._server: grpc.Server | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.outcomes: list[str] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> RelayServer:
        """Bind and serve.

        Raises:
            ChannelError: The address cannot be bound.
        """
        workers = self.limits.max_sessions + 4  # each open stream holds one worker
        size = self.limits.max_message_bytes
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="relay"),
            handlers=[
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "Handshake": grpc.unary_unary_rpc_method_handler(self._handshake),
                        "Session": grpc.stream_stream_rpc_method_handler(self._stream),
                    },
                )
            ],
            interceptors=self._interceptors,
            options=[
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=workers,
        )
        address = f"{self.host}:{self.port}"
        try:
            if self.tls is None:
                self.port = server.add_insecure_port(address)
            else:
                cert, key = self.tls
                credentials = grpc.ssl_server_credentials([(key, cert)])
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError as err:
            raise ChannelError(f"cannot bind {self.host}:{self.port}: {err}") from None
        server.start()
        self._server = server
        log.info("split relay listening on %s", self.address)
        return self

    @property
    def address(self) -> str:
        """``host:port`` clients connect to."""
        return f"{self.host}:{self.port}"

    @property
    def open_sessions(self) -> int:
        """Sessions handshaken and not yet closed."""
        with self._lock:
            return len(self._sessions)

    def wait_streams(self, count: int, timeout_s: float | None = None) -> bool:
        """Wait until ``count`` session streams have ended (finished or dropped).

        Returns:
            Whether they had within ``timeout_s`` (None: wait as long as it takes).
        """
        with self._ended:
            return self._ended.wait_for(lambda: len(self.outcomes) >= count, timeout_s)

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving and close every session still open (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait()
        with self._lock:
            tokens = list(self._sessions)
        for token in tokens:
            self._release(token)

    def __enter__(self) -> RelayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ sessions
    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            stale = [
                t
                for t, s in self._sessions.items()
                if not s.streaming and now - s.opened > self.limits.handshake_timeout_s
            ]
        for token in stale:
            self._release(token)

    def _claim(self, token_hex: str | None) -> tuple[bytes, int] | None:
        try:
            token = bytes.fromhex(token_hex or "")
        except ValueError:
            return None
        with self._lock:
            session = self._sessions.get(token)
            if session is None or session.streaming:
                return None
            session.streaming = True
            return token, session.sid

    def _release(self, token: bytes) -> None:
        with self._lock:
            session = self._sessions.pop(token, None)
        if session is None:
            return
        try:
            self.relay.close_channel(session.sid)
        except ShieldtuneError:
            pass  # dropped already (refused record) or the enclave is gone

    # ------------------------------------------------------------------ RPCs
    def _handshake(self, hello: bytes, context: grpc.ServicerContext) -> bytes:
        self._expire()
        with self._lock:
            full = len(self._sessions) + self._opening >= self.limits.max_sessions
            if not full:
                self._opening += 1
        if full:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server holds {self.limits.max_sessions} sessions (max_sessions); retry later",
            )
        try:
            sid, server_hello, problem = self._open(hello)
        finally:
            with self._lock:
                self._opening -= 1
        if problem is not None:
            context.abort(*problem)
        token = os.urandom(TOKEN_BYTES)
        with self._lock:
            self._sessions[token] = _Session(sid, time.monotonic())
        return token + server_hello

    def _open(self, hello: bytes) -> tuple[int, bytes, tuple[grpc.StatusCode, str] | None]:
        try:
            sid, server_hello = self.relay.open_channel(bytes(hello))
        except ChannelError as err:
            return 0, b"", (grpc.StatusCode.INVALID_ARGUMENT, f"handshake refused: {err}")
        except ShieldtuneError as err:
            return 0, b"", (grpc.StatusCode.UNAVAILABLE, f"enclave unavailable: {err}")
        return sid, server_hello, None

    def _stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        metadata = dict(context.invocation_metadata())
        claimed = self._claim(metadata.get(SESSION_METADATA))  # type: ignore[arg-type]
        if claimed is None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"unknown, expired or already streaming session token in {SESSION_METADATA!r}: "
                "run Handshake first",
            )
        token, sid = claimed  # type: ignore[misc]
        context.add_callback(lambda: self._release(token))
        inbox: queue.Queue[Any] = queue.Queue(maxsize=2)
        done = threading.Event()
        threading.Thread(
            target=_pump, args=(requests, inbox, done), daemon=True, name="relay-reader"
        ).start()
        outcome = "dropped"
        try:
            while True:
                try:
                    record = inbox.get(timeout=self.limits.idle_timeout_s)
                except queue.Empty:
                    context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no record for {self.limits.idle_timeout_s} s (idle_timeout_s): "
                        "session closed",
                    )
                if record is _END or record is _BROKEN:
                    outcome = "finished" if record is _END and _closed(context) else "dropped"
                    return
                reply, problem = self._relay_one(sid, record)
                if problem is not None:
                    context.abort(*problem)
                with self._lock:
                    self.bytes_in += len(record)
                    self.bytes_out += len(reply)
                yield reply
        finally:
            done.set()
            self._release(token)
            with self._ended:
                self.outcomes.append(outcome)
                self._ended.notify_all()

    def _relay_one(
        self, sid: int, record: bytes
    ) -> tuple[bytes, tuple[grpc.StatusCode, str] | None]:
        try:
            return self.relay.relay(sid, bytes(record)), None
        except ChannelError as err:
            return b"", (grpc.StatusCode.INVALID_ARGUMENT, f"record refused by the enclave: {err}")
        except ShieldtuneError as err:
            return b"", (grpc.StatusCode.UNAVAILABLE, f"enclave unavailable: {err}")


def _closed(context: grpc.ServicerContext, settle_s: float = 0.5) -> bool:
    """Whether a stream whose requests ended was closed by its client (the RPC stays open for
    our replies) rather than cancelled: a cancellation can end the requests a moment before
    gRPC marks the RPC inactive, so it gets ``settle_s`` to show."""
    end = time.monotonic() + settle_s
    while time.monotonic() < end:
        if not context.is_active():
            return False
        time.sleep(0.02)
    return context.is_active()


def _pump(requests: Iterator[bytes], inbox: queue.Queue[Any], done: threading.Event) -> None:
    """Move a stream's incoming records into ``inbox`` (so the handler can time out)."""

    def put(item: Any) -> bool:
        while not done.is_set():
            try:
                inbox.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    try:
        for record in requests:
            if not put(record):
                return
    except Exception:  # the RPC ended: cancelled, too large, connection lost
        put(_BROKEN)
        return
    put(_END)
