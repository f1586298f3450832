"""``SealedUpdateMod``: a Flower client mod that end-to-end encrypts updates to the server enclave.

It wraps the plain ``train`` / ``evaluate`` functions of
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
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from shieldtune.crypto.channel import (
    ChannelSession,
    ClientHello,
    KeyPair,
    ServerHello,
    SessionKeys,
    client_hello,
    derive_session_keys,
    transcript_hash,
)
from shieldtune.crypto.framing import Frame, FrameLimits, decode_frame, encode_frame
from shieldtune.errors import AttestationError, ChannelError, IntegrityError, ShieldtuneError
from shieldtune.federated.codec import (
    from_array_record,
    pack_records,
    to_array_record,
    unpack_records,
)
from shieldtune.federated.messages import CONNECT, HELLO
from shieldtune.tee.attestation import Evidence, Verifier
from shieldtune.tee.enclave import raise_error_frame

__all__ = ["SealedUpdateMod", "HELLO", "CONNECT", "PENDING_KEY", "CHANNEL_KEY"]

log = logging.getLogger("shieldtune.federated")
PENDING_KEY = "shieldtune.pending"  # Context.state entry between hello and connect
CHANNEL_KEY = "shieldtune.channel"  # Context.state entry of the established session
_STATE_LOCK = threading.Lock()  # in-process simulation: concurrent calls of one node


@dataclass
class _Session:
    channel: ChannelSession
    keys: SessionKeys
    client_id: str
    global_round: int = 0

    def to_record(self) -> ConfigRecord:
        k = self.keys
        return ConfigRecord(
            {
                "send_key": k.send_key,
                "send_iv": k.send_iv,
                "recv_key": k.recv_key,
                "recv_iv": k.recv_iv,
                "send_direction": k.send_direction,
                "recv_direction": k.recv_direction,
                "transcript": k.transcript,
                "send_seq": self.channel.send_seq,
                "recv_seq": self.channel.recv_seq,
                "client_id": self.client_id,
                "global_round": self.global_round,
            }
        )

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> _Session:
        try:
            keys = SessionKeys(
                send_key=_bytes(rec, "send_key"),
                send_iv=_bytes(rec, "send_iv"),
                recv_key=_bytes(rec, "recv_key"),
                recv_iv=_bytes(rec, "recv_iv"),
                send_direction=int(rec["send_direction"]),  # type: ignore[arg-type]
                recv_direction=int(rec["recv_direction"]),  # type: ignore[arg-type]
                transcript=_bytes(rec, "transcript"),
            )
            channel = ChannelSession(keys)
            channel.send_seq = int(rec["send_seq"])  # type: ignore[arg-type]
            channel.recv_seq = int(rec["recv_seq"])  # type: ignore[arg-type]
            return cls(channel, keys, str(rec["client_id"]), int(rec["global_round"]))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as err:
            raise ChannelError(f"stored channel session is unreadable: {err!r}") from None


def _bytes(rec: ConfigRecord, key: str) -> bytes:
    value = rec[key]
    if not isinstance(value, bytes):
        raise TypeError(f"{key} is {type(value).__name__}, not bytes")
    return value


class _IssuedNonce:
    """The verifier's nonce registry, restored from the context: one nonce, used once."""

    def __init__(self, nonce: bytes, issued: int, max_age_s: int) -> None:
        self.nonce, self.issued, self.max_age_s = nonce, issued, max_age_s

    def issue(self, now: object = None) -> bytes:  # pragma: no cover  (never called)
        raise AttestationError("a restored nonce registry issues no new nonces")

    def consume(self, nonce: bytes, now: object = None) -> None:
        """Accept the stored nonce once, while fresh (as ``NonceRegistry.consume``)."""
        if self.nonce is None or nonce != self.nonce:
            raise AttestationError(
                "nonce was not issued by this verifier or was already used: stale or replayed "
                "evidence; start a new handshake"
            )
        self.nonce = None
        age = int(time.time()) - self.issued
        if age > self.max_age_s:
            raise AttestationError(
                f"nonce is stale: issued {age} s ago, policy max_nonce_age_s={self.max_age_s}"
            )


class SealedUpdateMod:
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

    def __call__(self, msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        """Handle the handshake, or open / seal around the plain function."""
        kind = msg.metadata.message_type
        session: _Session | None = None
        try:
            if kind == HELLO:
                return self._hello(msg, ctx)
            if kind == CONNECT:
                return self._connect(msg, ctx)
            if kind.split(".")[0] in ("train", "evaluate"):
                session = self._load(ctx)
                return self._sealed_call(msg, ctx, call_next, session)
        except ShieldtuneError as err:
            self._forget(ctx, session)
            log.warning("node %s: %s: %s", ctx.node_id, type(err).__name__, err)
            reason = f"{type(err).__name__}: {err}"
            return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, reason), reply_to=msg)
        return call_next(msg, ctx)

    # ------------------------------------------------------------------ node state
    @staticmethod
    def _load(ctx: Context) -> _Session:
        with _STATE_LOCK:
            if CHANNEL_KEY not in ctx.state:
                raise ChannelError("no channel session with the server enclave (handshake first)")
            return _Session.from_record(ctx.state[CHANNEL_KEY])  # type: ignore[arg-type]

    @staticmethod
    def _store(ctx: Context, session: _Session) -> None:
        """Write the session's counters back, unless a newer handshake replaced it meanwhile."""
        with _STATE_LOCK:
            current = ctx.state.get(CHANNEL_KEY)
            if current is not None and current.get("transcript") == session.keys.transcript:
                ctx.state[CHANNEL_KEY] = session.to_record()

    @staticmethod
    def _forget(ctx: Context, session: _Session | None) -> None:
        """Drop the stored session (only the one that failed, not a newer one)."""
        with _STATE_LOCK:
            current = ctx.state.get(CHANNEL_KEY)
            if current is None:
                return
            if session is None or current.get("transcript") == session.keys.transcript:
                del ctx.state[CHANNEL_KEY]

    # ------------------------------------------------------------------ handshake
    def _hello(self, msg: Message, ctx: Context) -> Message:
        issued = int(time.time())
        keys, hello = client_hello()  # a fresh nonce from the OS CSPRNG; checked at connect
        pending = ConfigRecord(
            {
                "private": keys.private.private_bytes_raw(),
                "hello": hello.to_bytes(),
                "issued": issued,
            }
        )
        with _STATE_LOCK:
            ctx.state[PENDING_KEY] = pending
            if CHANNEL_KEY in ctx.state:
                del ctx.state[CHANNEL_KEY]
        content = RecordDict({"handshake": ConfigRecord({"hello": hello.to_bytes()})})
        return Message(content, reply_to=msg)

    def _connect(self, msg: Message, ctx: Context) -> Message:
        with _STATE_LOCK:
            pending = ctx.state.get(PENDING_KEY)
            if pending is not None:
                del ctx.state[PENDING_KEY]  # one connect per hello
        if pending is None:
            raise ChannelError("connect without a hello: the server must start the handshake")
        try:
            private = X25519PrivateKey.from_private_bytes(_bytes(pending, "private"))  # type: ignore[arg-type]
            hello = ClientHello.from_bytes(_bytes(pending, "hello"))  # type: ignore[arg-type]
            issued = int(pending["issued"])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as err:
            raise ChannelError(f"stored handshake state is unreadable: {err!r}") from None
        keys = KeyPair(private=private, public=private.public_key().public_bytes_raw())
        verifier = self.verifier()
        verifier.nonces = _IssuedNonce(hello.nonce, issued, verifier.policy.max_nonce_age_s)  # type: ignore[assignment]
        raw = msg.content["handshake"]["server_hello"]
        if not isinstance(raw, bytes):
            raise ChannelError("server hello missing from the connect message")
        server = ServerHello.from_bytes(raw)
        verifier.verify_channel(  # raises AttestationError: no secret is sent before this
            Evidence.from_json(server.evidence), hello=hello, enclave_public=server.enclave_public
        )
        transcript = transcript_hash(hello.client_public, hello.nonce, server.enclave_public)
        session_keys = derive_session_keys(keys, server.enclave_public, transcript, "client")
        session = _Session(ChannelSession(session_keys), session_keys, secrets.token_hex(8))
        fetch = self._seal(session, {"ecall": "fetch"})
        with _STATE_LOCK:
            ctx.state[CHANNEL_KEY] = session.to_record()
        return Message(RecordDict({"sealed": pack_records([fetch])}), reply_to=msg)

    # ------------------------------------------------------------------ rounds
    def _seal(
        self, session: _Session, meta: dict, tensors: dict[str, torch.Tensor] | None = None
    ) -> bytes:
        return bytes(session.channel.seal(encode_frame(meta, tensors, self.limits)))

    def _open(self, session: _Session, record: bytes) -> Frame:
        frame = decode_frame(session.channel.open(record), self.limits)
        raise_error_frame(frame, "server enclave refused a request")
        frame.meta.pop("op", None)
        return frame

    def _sealed_call(
        self, msg: Message, ctx: Context, call_next: ClientAppCallable, session: _Session
    ) -> Message:
        if "sealed" not in msg.content:  # never answer a plain server with a clear update
            raise ChannelError("the message carries no sealed records; is the server plain?")
        glob: dict[str, torch.Tensor] | None = None
        for record in unpack_records(msg.content["sealed"]):
            frame = self._open(session, record)
            if "accepted" in frame.meta:  # the enclave's answer to our last submit
                if not frame.meta["accepted"]:
                    log.warning("node %s: update refused: %s", ctx.node_id, frame.meta["reason"])
                continue
            session.global_round = frame.meta_int("round")
            glob = dict(frame.tensors)
        if glob is None:
            raise IntegrityError("the message carries no global adapter from the enclave")
        self._store(ctx, session)  # the opened records are spent, whatever happens next
        config = msg.content["config"] if "config" in msg.content else ConfigRecord()
        msg.content = RecordDict({"arrays": to_array_record(glob), "config": config})
        reply = call_next(msg, ctx)
        if reply.has_error():
            self._forget(ctx, session)
            return reply
        records = []
        if msg.metadata.message_type.startswith("train"):
            metrics = reply.content["metrics"]
            update = from_array_record(reply.content["arrays"])
            meta = {
                "ecall": "submit",
                "client": session.client_id,
                "round": session.global_round + 1,
                "num_examples": float(metrics["num-examples"]),  # type: ignore[arg-type]
            }
            records.append(self._seal(session, meta, update))
        records.append(self._seal(session, {"ecall": "fetch"}))
        self._store(ctx, session)
        content = RecordDict({"sealed": pack_records(records), "metrics": reply.content["metrics"]})
        return Message(content, reply_to=msg)
