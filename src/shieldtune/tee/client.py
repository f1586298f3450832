"""Client end of the attested channel: handshake, verification, encrypted ECALLs.

The client talks to the enclave through two relay functions supplied by the transport (gRPC,
in-process...): ``handshake(client_hello) -> server_hello`` and ``send(record) -> record``.
Whoever relays sees only the hellos (public keys, nonce, evidence) and ciphertext.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

import torch

from shieldtune.crypto.channel import ChannelSession, ServerHello, client_hello, client_session
from shieldtune.crypto.framing import Frame, FrameLimits, MetaValue, decode_frame, encode_frame
from shieldtune.errors import EnclaveError
from shieldtune.tee.attestation import Evidence, Quote, Verifier
from shieldtune.tee.enclave import Enclave, raise_error_frame

__all__ = ["SecureClient", "connect_local"]


class SecureClient:
    """A verified channel session to one enclave.

    Build it with :meth:`connect` (or :func:`connect_local` for an enclave in this process).

    Attributes:
        quote: The verified attestation claims of the enclave.
    """

    def __init__(
        self,
        session: ChannelSession,
        quote: Quote,
        send: Callable[[bytes], bytes],
        limits: FrameLimits | None = None,
    ) -> None:
        self._session = session
        self.quote = quote
        self._send = send
        self._limits = limits or FrameLimits()

    @classmethod
    def connect(
        cls,
        verifier: Verifier,
        handshake: Callable[[bytes], bytes],
        send: Callable[[bytes], bytes],
        now: datetime | float | None = None,
    ) -> SecureClient:
        """Run the handshake and verify the enclave before any secret is sent.

        Raises:
            AttestationError: The evidence failed verification or policy.
            ChannelError: A malformed server hello.
        """
        keys, hello = client_hello(verifier.issue_nonce(now))
        server = ServerHello.from_bytes(handshake(hello.to_bytes()))
        evidence = Evidence.from_json(server.evidence)
        quote = verifier.verify_channel(
            evidence, hello=hello, enclave_public=server.enclave_public, now=now
        )
        return cls(client_session(keys, hello, server.enclave_public), quote, send)

    def call(
        self,
        ecall: str,
        meta: Mapping[str, MetaValue] | None = None,
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> Frame:
        """Run an ECALL over the encrypted channel.

        Raises:
            ChannelError: A refused record (the session is then closed).
            EnclaveError (or the error class the enclave reported): the ECALL failed.
        """
        meta = dict(meta or {})
        if "op" in meta or "ecall" in meta:
            raise EnclaveError("ECALL arguments may not use reserved keys 'op' / 'ecall'")
        plaintext = encode_frame({"ecall": ecall, **meta}, tensors, self._limits)
        reply = decode_frame(
            self._session.open(self._send(self._session.seal(plaintext))), self._limits
        )
        raise_error_frame(reply, f"enclave refused {ecall!r}")
        reply.meta.pop("op", None)
        return reply


def connect_local(
    enclave: Enclave, verifier: Verifier, now: datetime | float | None = None
) -> tuple[SecureClient, int]:
    """Connect to an enclave held by this process (the host relays the bytes).

    Returns:
        The client and the enclave-side session id.
    """
    opened: list[int] = []

    def handshake(hello: bytes) -> bytes:
        session, server_hello = enclave.open_channel(hello)
        opened.append(session)
        return server_hello

    def send(record: bytes) -> bytes:
        return enclave.relay(opened[0], record)

    client = SecureClient.connect(verifier, handshake, send, now)
    return client, opened[0]
