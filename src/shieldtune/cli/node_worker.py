"""A client host's warm worker: Flower's per-message ClientApp processes hand it their message.

A Flower 1.42 SuperNode runs every message in a fresh ``flwr-clientapp`` process. Loading
transformers, the model and the data costs seconds per message (minutes for a large model);
``shieldtune join`` therefore keeps one worker, a thread in its own process, that holds them
warm. The ClientApp process (:mod:`shieldtune.cli.flower_app`) then only forwards: it sends the
message and the node's context over a Unix socket in ``join``'s private folder (mode 0700), the
worker runs the same ClientApp code on them and sends back the reply and the context. Per-node
protocol state still lives in ``Context.state`` (it travels both ways), so the worker holds
caches only; ``shieldtune join --no-worker`` runs each message in its own process instead.

Framing: each side sends two length-prefixed (u64 big-endian) Flower protobufs, the message
then the context (``flwr.common.serde``); no pickle.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

__all__ = ["NodeWorker", "forward"]

log = logging.getLogger("shieldtune.federated")
_LEN = struct.Struct(">Q")
_MAX_FRAME = 8 * 2**30  # refuse absurd lengths (a corrupt stream), not big adapters


def _send(sock: socket.socket, *parts: bytes) -> None:
    sock.sendall(b"".join(_LEN.pack(len(p)) + p for p in parts))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("node worker connection closed mid-frame")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > _MAX_FRAME:
        raise ConnectionError(f"node worker frame of {n} bytes refused")
    return _recv_exact(sock, n)


def _pack(msg: Message, ctx: Context) -> tuple[bytes, bytes]:
    from flwr.common.serde import context_to_proto, message_to_proto

    return (
        message_to_proto(msg).SerializeToString(),
        context_to_proto(ctx).SerializeToString(),
    )


def _unpack(msg_bytes: bytes, ctx_bytes: bytes) -> tuple[Message, Context]:
    from flwr.common.serde import context_from_proto, message_from_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    pm, pc = ProtoMessage(), ProtoContext()
    pm.ParseFromString(msg_bytes)
    pc.ParseFromString(ctx_bytes)
    return message_from_proto(pm), context_from_proto(pc)


def forward(
    path: str | Path, msg: Message, ctx: Context, timeout_s: float | None = None
) -> Message:
    """Run ``msg`` in the node worker at ``path``; ``ctx.state`` becomes the worker's result.

    Raises:
        ConnectionError: The worker is unreachable or broke the connection.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except OSError as err:
            raise ConnectionError(f"node worker at {path} is unreachable: {err}") from None
        _send(sock, *_pack(msg, ctx))
        reply, after = _unpack(_recv(sock), _recv(sock))
    for key in list(ctx.state.keys()):  # the context object Flower pushes back is ours
        del ctx.state[key]
    for key, value in after.state.items():
        ctx.state[key] = value
    return reply


class NodeWorker:
    """Serves :func:`forward` requests with ``handle(msg, ctx) -> reply``, one at a time.

    Args:
        path: Unix socket path (in a private folder).
        handle: Runs a message (the ClientApp code); may mutate ``ctx.state``.
    """

    def __init__(self, path: Path, handle: Callable[[Message, Context], Message]) -> None:
        self.path = Path(path)
        self.handle = handle
        self._lock = threading.Lock()  # one message at a time, as one node
        worker = self

        class _Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                worker._serve(self.request)

        class _Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

        self.server = _Server(str(self.path), _Handler)
        self.path.chmod(0o600)
        self.thread = threading.Thread(target=self.server.serve_forever, name="node-worker")

    def start(self) -> NodeWorker:
        """Serve in a background thread."""
        self.thread.daemon = True
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and remove the socket."""
        self.server.shutdown()
        self.server.server_close()
        self.path.unlink(missing_ok=True)

    def _serve(self, sock: socket.socket) -> None:
        try:
            msg, ctx = _unpack(_recv(sock), _recv(sock))
        except (ConnectionError, ValueError) as err:
            log.warning("node worker: bad request: %s", err)
            return
        with self._lock:
            try:
                reply = self.handle(msg, ctx)
            except Exception as ex:  # noqa: BLE001  (reported to the server, as Flower does)
                log.exception("node worker: the ClientApp raised")
                reason = f"{type(ex).__name__}: {ex}"
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
        try:
            _send(sock, *_pack(reply, ctx))
        except OSError as err:
            log.warning("node worker: could not answer: %s", err)
