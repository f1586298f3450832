"""``SealedUpdateMod``: a Flower client mod that end-to-end encrypts updates to the server enclave.

It wraps the plain ``train`` / ``evaluate`` functions of
:mod:`~shieldtune.federated.client_app` (``(msg, ctx, call_next) -> msg``) and answers the
handshake queries itself:

1. ``query.shieldtune_hello``: a fresh X25519 key pair and a nonce from the client's own
   :class:`~shieldtune.tee.attestation.Verifier`; the reply carries the client hello.
2. ``query.shieldtune_connect``: carries the enclave's server hello and evidence; the client
   verifies it (measurement allow-list, simulated only with explicit opt-in, report data binds
   the enclave key) and only then derives the session. It replies with a sealed ``fetch``
   request. A failed verification is an error reply: the server cannot use this client.
3. ``train`` / ``evaluate``: carry sealed records: the enclave's replies to this client's earlier
   requests, the last one the global adapter. The mod opens them, hands the plain function a
   message with the global adapter in ``arrays``, and seals the reply: ``submit`` (the update,
   train only) then a new ``fetch`` (the global adapter of the next message). Flower, the
   SuperLink and the server host only carry ``uint8`` ciphertext.

Sessions live in this mod object, per node (one process per client in a deployment; the
in-process simulation keeps all nodes' sessions apart by node id).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from shieldtune.crypto.channel import (
    ChannelSession,
    ClientHello,
    KeyPair,
    ServerHello,
    client_hello,
    client_session,
)
from shieldtune.crypto.framing import Frame, FrameLimits, decode_frame, encode_frame
from shieldtune.errors import ChannelError, IntegrityError, ShieldtuneError
from shieldtune.federated.client_app import HANDSHAKE_ACTIONS
from shieldtune.federated.codec import (
    from_array_record,
    pack_records,
    to_array_record,
    unpack_records,
)
from shieldtune.tee.attestation import Evidence, Verifier
from shieldtune.tee.enclave import raise_error_frame

__all__ = ["SealedUpdateMod", "HELLO", "CONNECT"]

log = logging.getLogger("shieldtune.federated")
HELLO = f"query.{HANDSHAKE_ACTIONS[0]}"
CONNECT = f"query.{HANDSHAKE_ACTIONS[1]}"


@dataclass
class _Session:
    channel: ChannelSession
    client_id: str
    global_round: int = 0


class SealedUpdateMod:
    """Client mod: attested channel to the server enclave; updates leave only encrypted.

    Args:
        verifier: Returns the verifier (policy: allowed measurements, ``allow_simulated``...)
            this client checks the server enclave with; called once per handshake.
        limits: Frame size limits (default: :class:`FrameLimits`).
    """

    def __init__(self, verifier: Callable[[], Verifier], limits: FrameLimits | None = None) -> None:
        self.verifier = verifier
        self.limits = limits or FrameLimits()
        self._pending: dict[int, tuple[Verifier, KeyPair, ClientHello]] = {}
        self._sessions: dict[int, _Session] = {}
        self._lock = threading.Lock()

    def __call__(self, msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        """Handle the handshake, or open / seal around the plain function."""
        kind = msg.metadata.message_type
        try:
            if kind == HELLO:
                return self._hello(msg, ctx)
            if kind == CONNECT:
                return self._connect(msg, ctx)
            if kind.split(".")[0] in ("train", "evaluate"):
                return self._sealed_call(msg, ctx, call_next)
        except ShieldtuneError as err:
            with self._lock:
                self._sessions.pop(ctx.node_id, None)
            log.warning("node %s: %s: %s", ctx.node_id, type(err).__name__, err)
            reason = f"{type(err).__name__}: {err}"
            return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, reason), reply_to=msg)
        return call_next(msg, ctx)

    # ------------------------------------------------------------------ handshake
    def _hello(self, msg: Message, ctx: Context) -> Message:
        verifier = self.verifier()
        keys, hello = client_hello(verifier.issue_nonce())
        with self._lock:
            self._pending[ctx.node_id] = (verifier, keys, hello)
            self._sessions.pop(ctx.node_id, None)
        content = RecordDict({"handshake": ConfigRecord({"hello": hello.to_bytes()})})
        return Message(content, reply_to=msg)

    def _connect(self, msg: Message, ctx: Context) -> Message:
        with self._lock:
            pending = self._pending.pop(ctx.node_id, None)
        if pending is None:
            raise ChannelError("connect without a hello: the server must start the handshake")
        verifier, keys, hello = pending
        raw = msg.content["handshake"]["server_hello"]
        if not isinstance(raw, bytes):
            raise ChannelError("server hello missing from the connect message")
        server = ServerHello.from_bytes(raw)
        verifier.verify_channel(  # raises AttestationError: no secret is sent before this
            Evidence.from_json(server.evidence), hello=hello, enclave_public=server.enclave_public
        )
        session = _Session(client_session(keys, hello, server.enclave_public), secrets.token_hex(8))
        with self._lock:
            self._sessions[ctx.node_id] = session
        fetch = self._seal(session, {"ecall": "fetch"})
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

    def _sealed_call(self, msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        with self._lock:
            session = self._sessions.get(ctx.node_id)
        if session is None:
            raise ChannelError("no channel session with the server enclave (handshake first)")
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
        config = msg.content["config"] if "config" in msg.content else ConfigRecord()
        msg.content = RecordDict({"arrays": to_array_record(glob), "config": config})
        reply = call_next(msg, ctx)
        if reply.has_error():
            with self._lock:
                self._sessions.pop(ctx.node_id, None)
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
        content = RecordDict({"sealed": pack_records(records), "metrics": reply.content["metrics"]})
        return Message(content, reply_to=msg)
