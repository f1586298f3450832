"""A client's end of an attested channel whose records someone else relays: the federation's.

Unlike :class:`~shieldtune.tee.client.SecureClient` (a live connection), the state here is
plain data the holder can store between messages. The round helpers speak the ``fedavg``
server enclave's requests (``submit``, ``fetch``). Two places hold a federation client's end,
with the same code:

- the client's host process (``secure-fedavg``: :class:`~shieldtune.federated.mods.SealedUpdateMod`
  keeps the state between Flower messages in the node's ``Context``);
- the client's own enclave (``shielded-fedavg``: the ``shielded-party`` program keeps it in
  enclave memory, so the adapter and the global adapter never exist outside a TEE, and the
  client's host relays ciphertext exactly as the server's host does).

Protocol (the server enclave's ECALLs are in :mod:`~shieldtune.federated.enclave_program`):

1. :func:`start` makes a fresh X25519 key pair and nonce (a :class:`Pending` hello);
2. :func:`connect` verifies the server enclave's evidence against the client's policy (the
   measurement of the ``fedavg`` program, simulated only with explicit opt-in, the report data
   binding the enclave's key) and only then derives the :class:`ClientSession`;
3. each round the client opens the enclave's sealed replies (:meth:`ClientSession.open_round`:
   the answer to its last ``submit`` and the global adapter) and seals its own requests
   (:meth:`ClientSession.reply`: ``submit`` with the update after training, then ``fetch``).

Nothing here imports Flower or a model: this module also runs inside the client's enclave,
where every module loaded is part of the measurement.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

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
from shieldtune.errors import AttestationError, ChannelError
from shieldtune.tee.attestation import Evidence, Verifier
from shieldtune.tee.enclave import raise_error_frame

__all__ = ["Pending", "ClientSession", "start", "connect"]

log = logging.getLogger("shieldtune.federated")
State = dict[str, bytes | int | str]  # what the host stores (Flower ConfigRecord values)


def _bytes(state: State, key: str) -> bytes:
    value = state[key]
    if not isinstance(value, bytes):
        raise TypeError(f"{key} is {type(value).__name__}, not bytes")
    return value


@dataclass
class Pending:
    """A client hello sent, the server's answer not yet verified."""

    private: X25519PrivateKey
    hello: ClientHello
    issued: int  # when the nonce was issued (its age is checked at connect)

    def to_state(self) -> State:
        return {
            "private": self.private.private_bytes_raw(),
            "hello": self.hello.to_bytes(),
            "issued": self.issued,
        }

    @classmethod
    def from_state(cls, state: State) -> Pending:
        try:
            private = X25519PrivateKey.from_private_bytes(_bytes(state, "private"))
            return cls(
                private, ClientHello.from_bytes(_bytes(state, "hello")), int(state["issued"])
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ChannelError(f"stored handshake state is unreadable: {err!r}") from None


def start() -> Pending:
    """A fresh key pair and nonce from the OS CSPRNG (checked at :func:`connect`)."""
    keys, hello = client_hello()
    return Pending(keys.private, hello, int(time.time()))


class _IssuedNonce:
    """The verifier's nonce registry for one pending hello: its nonce, accepted once."""

    def __init__(self, nonce: bytes, issued: int, max_age_s: int) -> None:
        self.nonce: bytes | None = nonce
        self.issued, self.max_age_s = issued, max_age_s

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


@dataclass
class ClientSession:
    """An established channel to the server enclave, with the last global round seen."""

    channel: ChannelSession
    keys: SessionKeys
    client_id: str
    global_round: int = 0

    # ------------------------------------------------------------------ storage
    def to_state(self) -> State:
        k = self.keys
        return {
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

    @classmethod
    def from_state(cls, state: State) -> ClientSession:
        try:
            keys = SessionKeys(
                send_key=_bytes(state, "send_key"),
                send_iv=_bytes(state, "send_iv"),
                recv_key=_bytes(state, "recv_key"),
                recv_iv=_bytes(state, "recv_iv"),
                send_direction=int(state["send_direction"]),
                recv_direction=int(state["recv_direction"]),
                transcript=_bytes(state, "transcript"),
            )
            channel = ChannelSession(keys)
            channel.send_seq = int(state["send_seq"])
            channel.recv_seq = int(state["recv_seq"])
            return cls(channel, keys, str(state["client_id"]), int(state["global_round"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ChannelError(f"stored channel session is unreadable: {err!r}") from None

    # ------------------------------------------------------------------ records
    def seal(
        self,
        meta: dict,
        tensors: dict[str, torch.Tensor] | None = None,
        limits: FrameLimits | None = None,
    ) -> bytes:
        """One request to the server enclave, encrypted (sequence number used once)."""
        return bytes(self.channel.seal(encode_frame(meta, tensors, limits or FrameLimits())))

    def open(self, record: bytes, limits: FrameLimits | None = None) -> Frame:
        """One reply of the server enclave (refused: tampered, replayed, reordered, error)."""
        frame = decode_frame(self.channel.open(record), limits or FrameLimits())
        raise_error_frame(frame, "server enclave refused a request")
        frame.meta.pop("op", None)
        return frame

    def open_round(
        self, records: list[bytes], limits: FrameLimits | None = None
    ) -> tuple[dict[str, torch.Tensor] | None, list[str]]:
        """Open a round's records: the answers to earlier submits, then the global adapter.

        Returns:
            ``(global adapter or None if no record carried one, refusal reasons of this
            client's earlier updates)``. The global adapter is empty before the first
            aggregation (start from the shared seeded initialisation).
        """
        glob: dict[str, torch.Tensor] | None = None
        refused: list[str] = []
        for record in records:
            frame = self.open(record, limits)
            if "accepted" in frame.meta:  # the enclave's answer to our last submit
                if not frame.meta["accepted"]:
                    refused.append(str(frame.meta.get("reason")))
                continue
            self.global_round = frame.meta_int("round")
            glob = dict(frame.tensors)
        return glob, refused

    def reply(
        self,
        update: dict[str, torch.Tensor] | None,
        num_examples: float = 0.0,
        limits: FrameLimits | None = None,
    ) -> list[bytes]:
        """``submit`` of ``update`` (trained on ``num_examples``) if any, then ``fetch``."""
        records = []
        if update is not None:
            meta = {
                "ecall": "submit",
                "client": self.client_id,
                "round": self.global_round + 1,
                "num_examples": float(num_examples),
            }
            records.append(self.seal(meta, update, limits))
        records.append(self.seal({"ecall": "fetch"}, None, limits))
        return records


def connect(pending: Pending, server_hello: bytes, verifier: Verifier) -> ClientSession:
    """Verify the server enclave's answer to ``pending``; derive the session only if it passes.

    Raises:
        AttestationError: The evidence failed verification or the client's policy.
        ChannelError: A malformed server hello.
    """
    verifier.nonces = _IssuedNonce(  # type: ignore[assignment]
        pending.hello.nonce, pending.issued, verifier.policy.max_nonce_age_s
    )
    server = ServerHello.from_bytes(server_hello)
    verifier.verify_channel(  # raises: no secret is derived or sent before this passes
        Evidence.from_json(server.evidence),
        hello=pending.hello,
        enclave_public=server.enclave_public,
    )
    keys = KeyPair(private=pending.private, public=pending.private.public_key().public_bytes_raw())
    hello = pending.hello
    transcript = transcript_hash(hello.client_public, hello.nonce, server.enclave_public)
    session_keys = derive_session_keys(keys, server.enclave_public, transcript, "client")
    return ClientSession(ChannelSession(session_keys), session_keys, secrets.token_hex(8))
