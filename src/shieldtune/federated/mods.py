"""Flower client mods that end-to-end encrypt updates to the server enclave.

Two mods, one protocol (:mod:`~shieldtune.tee.endpoint`), differing only in where the
client's end of the channel lives:

- ``SealedUpdateMod`` (secure-fedavg): in the client's host process, the node state in Flower's
  ``Context`` (below);
- ``PartySealedMod`` (shielded-fedavg): inside the client's own enclave (the
  ``shielded-party`` program); the mod relays ciphertext to it, and the plain train and evaluate
  functions receive and return no adapter tensors at all.

``SealedUpdateMod`` wraps the plain ``train`` / ``evaluate`` functions of
:mod:`~shieldtune.federated.client_app` (``(msg, ctx, call_next) -> msg``) and answers the
handshake queries itself:

1. ``query.shieldtune_hello``: a fresh X25519 key pair and a fresh nonce (kept with its issue
   time for the client's :class:`~shieldtune.tee.attestation.Verifier`); the reply carries the
   client hello.
2. ``query.shieldtune_connect``: carries the enclave's server hello and evidence; the client
   verifies it (measurement allow-list, simulated only with explicit opt-in, report data binds
   the enclave key) and only then derives the session. It replies with a sealed ``fetch``
   request. A failed verification is an error reply: the server cannot use this client.
3. ``train`` / ``evaluate``: carry sealed records: the enclave's replies to this client's earlier
   requests, the last one the global adapter. The mod opens them, hands the plain function a
   message with the global adapter in ``arrays``, and seals the reply: ``submit`` (the update,
   train only) then a new ``fetch`` (the global adapter of the next message). Flower, the
   SuperLink and the server host only carry ``uint8`` ciphertext.

Per-node state lives in the node's Flower ``Context.state`` (a ``RecordDict``), never in this
object or in module globals: a Flower 1.42 SuperNode runs every message in a fresh ClientApp
process and hands it the node's context, so what one message leaves there is what the next one
finds. Two ``ConfigRecord`` entries:

- ``shieldtune.pending`` (between ``hello`` and ``connect``): the ephemeral X25519 private key,
  the client hello and the verifier's nonce with its issue time;
- ``shieldtune.channel`` (after ``connect``): the session's AEAD keys and nonce prefixes, both
  sequence counters, the transcript hash, the client id and the last global round seen.

The context stays on the client's host (SuperNode memory and its local Runtime API, loopback):
the same trust domain as the client's data. Reusing a stored session is safe because the
counters travel with the keys: a record is sealed with a sequence number exactly once, and a
replayed or reordered one is refused on open.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from shieldtune.crypto.framing import FrameLimits, bytes_to_tensor, tensor_to_bytes
from shieldtune.errors import ChannelError, IntegrityError, ShieldtuneError
from shieldtune.federated.codec import (
    from_array_record,
    pack_records,
    to_array_record,
    unpack_records,
)
from shieldtune.federated.messages import CONNECT, HELLO
from shieldtune.tee import endpoint
from shieldtune.tee.attestation import Verifier

__all__ = ["SealedUpdateMod", "PartySealedMod", "HELLO", "CONNECT", "PENDING_KEY", "CHANNEL_KEY"]

log = logging.getLogger("shieldtune.federated")
PENDING_KEY = "shieldtune.pending"  # Context.state entry between hello and connect
CHANNEL_KEY = "shieldtune.channel"  # Context.state entry of the established session
_STATE_LOCK = threading.Lock()  # in-process simulation: concurrent calls of one node


class _SealingMod:
    """The message flow both mods share; subclasses say where the channel's end is.

    ``hello`` / ``connect`` answer the server's handshake queries; ``open`` turns a round's
    sealed records into what the plain function reads (the global adapter, or nothing when it
    stays in an enclave) plus a token for ``seal``/``failed``; ``seal`` turns the plain reply's
    update (``None`` for evaluate) into sealed records.
    """

    def hello(self, ctx: Context) -> bytes:
        raise NotImplementedError

    def connect(self, ctx: Context, server_hello: bytes) -> bytes:
        raise NotImplementedError

    def open(self, ctx: Context, records: list[bytes]) -> tuple[dict[str, torch.Tensor], Any]:
        raise NotImplementedError

    def seal(
        self, ctx: Context, token: Any, update: dict[str, torch.Tensor] | None, n: float
    ) -> list[bytes]:
        raise NotImplementedError

    def failed(self, ctx: Context, token: Any) -> None:
        """Forget the session that failed (a new handshake follows)."""

    def __call__(self, msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        """Handle the handshake, or open / seal around the plain function."""
        kind = msg.metadata.message_type
        token: Any = None
        try:
            if kind == HELLO:
                hello = ConfigRecord({"hello": self.hello(ctx)})
                return Message(RecordDict({"handshake": hello}), reply_to=msg)
            if kind == CONNECT:
                raw = msg.content["handshake"]["server_hello"]
                if not isinstance(raw, bytes):
                    raise ChannelError("server hello missing from the connect message")
                fetch = self.connect(ctx, raw)
                return Message(RecordDict({"sealed": pack_records([fetch])}), reply_to=msg)
            if kind.split(".")[0] in ("train", "evaluate"):
                if "sealed" not in msg.content:  # never answer a plain server with a clear update
                    raise ChannelError(
                        "the message carries no sealed records; is the server plain?"
                    )
                glob, token = self.open(ctx, unpack_records(msg.content["sealed"]))
                config = msg.content["config"] if "config" in msg.content else ConfigRecord()
                msg.content = RecordDict({"arrays": to_array_record(glob), "config": config})
                reply = call_next(msg, ctx)
                if reply.has_error():
                    self.failed(ctx, token)
                    return reply
                metrics = reply.content["metrics"]
                train = kind.startswith("train")
                update = from_array_record(reply.content["arrays"]) if train else None
                n = float(metrics["num-examples"]) if train else 0.0  # type: ignore[arg-type]
                records = self.seal(ctx, token, update, n)
                content = RecordDict({"sealed": pack_records(records), "metrics": metrics})
                return Message(content, reply_to=msg)
        except ShieldtuneError as err:
            self.failed(ctx, token)
            log.warning("node %s: %s: %s", ctx.node_id, type(err).__name__, err)
            reason = f"{type(err).__name__}: {err}"
            return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, reason), reply_to=msg)
        return call_next(msg, ctx)


class SealedUpdateMod(_SealingMod):
    """Client mod: attested channel to the server enclave; updates leave only encrypted.

    Holds no per-node state itself (see the module docstring): a fresh instance per message,
    as in a Flower deployment, behaves exactly as one long-lived instance.

    Args:
        verifier: Returns the verifier (policy: allowed measurements, ``allow_simulated``...)
            this client checks the server enclave with; called once per handshake (at
            ``connect``, with the hello's nonce restored from the context).
        limits: Frame size limits (default: :class:`FrameLimits`).
    """

    def __init__(self, verifier: Callable[[], Verifier], limits: FrameLimits | None = None) -> None:
        self.verifier = verifier
        self.limits = limits or FrameLimits()

    # ------------------------------------------------------------------ node state
    @staticmethod
    def _load(ctx: Context) -> endpoint.ClientSession:
        with _STATE_LOCK:
            if CHANNEL_KEY not in ctx.state:
                raise ChannelError("no channel session with the server enclave (handshake first)")
            return endpoint.ClientSession.from_state(dict(ctx.state[CHANNEL_KEY]))  # type: ignore[arg-type]

    @staticmethod
    def _store(ctx: Context, session: endpoint.ClientSession) -> None:
        """Write the session's counters back, unless a newer handshake replaced it meanwhile."""
        with _STATE_LOCK:
            current = ctx.state.get(CHANNEL_KEY)
            if current is not None and current.get("transcript") == session.keys.transcript:
                ctx.state[CHANNEL_KEY] = ConfigRecord(session.to_state())  # type: ignore[arg-type]

    def failed(self, ctx: Context, token: Any) -> None:
        """Drop the stored session (only the one that failed, not a newer one)."""
        with _STATE_LOCK:
            current = ctx.state.get(CHANNEL_KEY)
            if current is None:
                return
            if token is None or current.get("transcript") == token.keys.transcript:
                del ctx.state[CHANNEL_KEY]

    # ------------------------------------------------------------------ handshake
    def hello(self, ctx: Context) -> bytes:
        pending = endpoint.start()
        with _STATE_LOCK:
            ctx.state[PENDING_KEY] = ConfigRecord(pending.to_state())  # type: ignore[arg-type]
            if CHANNEL_KEY in ctx.state:
                del ctx.state[CHANNEL_KEY]
        return pending.hello.to_bytes()

    def connect(self, ctx: Context, server_hello: bytes) -> bytes:
        with _STATE_LOCK:
            stored = ctx.state.get(PENDING_KEY)
            if stored is not None:
                del ctx.state[PENDING_KEY]  # one connect per hello
        if stored is None:
            raise ChannelError("connect without a hello: the server must start the handshake")
        pending = endpoint.Pending.from_state(dict(stored))  # type: ignore[arg-type]
        session = endpoint.connect(pending, server_hello, self.verifier())
        fetch = session.reply(None, limits=self.limits)[0]
        with _STATE_LOCK:
            ctx.state[CHANNEL_KEY] = ConfigRecord(session.to_state())  # type: ignore[arg-type]
        return fetch

    # ------------------------------------------------------------------ rounds
    def open(
        self, ctx: Context, records: list[bytes]
    ) -> tuple[dict[str, torch.Tensor], endpoint.ClientSession]:
        session = self._load(ctx)
        try:
            glob, refused = session.open_round(records, self.limits)
        except ShieldtuneError:
            self.failed(ctx, session)
            raise
        for reason in refused:
            log.warning("node %s: update refused: %s", ctx.node_id, reason)
        if glob is None:
            self.failed(ctx, session)
            raise IntegrityError("the message carries no global adapter from the enclave")
        self._store(ctx, session)  # the opened records are spent, whatever happens next
        return glob, session

    def seal(
        self,
        ctx: Context,
        token: endpoint.ClientSession,
        update: dict[str, torch.Tensor] | None,
        n: float,
    ) -> list[bytes]:
        records = token.reply(update, n, self.limits)
        self._store(ctx, token)
        return records


class PartyCaller(Protocol):
    """An attested channel from the client's host to its own enclave (``call(ecall, ...)``)."""

    def call(self, ecall: str, meta: dict | None = None, tensors: dict | None = None) -> Any: ...


def _records(tensors: dict[str, torch.Tensor]) -> list[bytes]:
    return [tensor_to_bytes(tensors[f"record.{i}"]) for i in range(len(tensors))]


def _as_tensors(records: list[bytes]) -> dict[str, torch.Tensor]:
    return {f"record.{i}": bytes_to_tensor(r) for i, r in enumerate(records)}


class PartySealedMod(_SealingMod):
    """Client mod whose channel to the server enclave ends inside the client's enclave.

    The client's host relays the server's records into its enclave (``fed_*`` ECALLs of the
    ``shielded-party`` program, over the host's own attested channel to it) and the enclave's
    records back: the host never holds the update, the global adapter or the session keys.

    Args:
        party_for: The node's enclave (an attested :class:`PartyCaller`), by Flower context.
    """

    def __init__(self, party_for: Callable[[Context], PartyCaller]) -> None:
        self.party_for = party_for

    def hello(self, ctx: Context) -> bytes:
        return tensor_to_bytes(self.party_for(ctx).call("fed_hello").tensors["hello"])

    def connect(self, ctx: Context, server_hello: bytes) -> bytes:
        reply = self.party_for(ctx).call(
            "fed_connect", tensors={"server_hello": bytes_to_tensor(server_hello)}
        )
        return _records(reply.tensors)[0]

    def open(self, ctx: Context, records: list[bytes]) -> tuple[dict[str, torch.Tensor], None]:
        reply = self.party_for(ctx).call("fed_open", tensors=_as_tensors(records))
        for reason in reply.meta.get("refused") or []:
            log.warning("node %s: update refused: %s", ctx.node_id, reason)
        return {}, None  # the global adapter stays in the enclave

    def seal(
        self, ctx: Context, token: None, update: dict[str, torch.Tensor] | None, n: float
    ) -> list[bytes]:
        if update:  # the plain function must not produce a clear update here
            raise IntegrityError("a clear adapter update reached the host of a shielded client")
        meta = {"submit": update is not None, "num_examples": n}
        return _records(self.party_for(ctx).call("fed_seal", meta).tensors)
