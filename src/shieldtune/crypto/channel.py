"""Attested channel: X25519 + HKDF-SHA256 + AES-256-GCM with sequence numbers.

Handshake (the enclave's end runs inside the enclave; the host only relays bytes)::

    client:  (c, C) <- X25519 ephemeral, n <- 32 random bytes      --ClientHello(C, n)-->
    enclave: (e, E) <- X25519 ephemeral, rd = SHA-512(E || n || C)  (64 bytes, into the quote)
                                                                   <--ServerHello(E, evidence)--
    client:  verify the evidence (measurement, policy) and that its report data equals rd.
    both:    th = SHA-256("shieldtune-channel-v1" || C || n || E)          (transcript hash)
             okm = HKDF-SHA256(ikm = X25519(c, E) = X25519(e, C), salt = th, info = label)
             k_c2e, iv_c2e, k_e2c, iv_e2c = okm split 32 / 4 / 32 / 4

Records::

    header = "STCR" || version (1) || direction || seq (u64 BE)
             (direction 1: client->enclave, 2: enclave->client)
    record = header || AES-256-GCM(k_dir, nonce = iv_dir || seq, plaintext, aad = header)

The receiver authenticates first (a bad tag means tampering or a wrong key), then requires
``seq`` to be exactly the next expected number: an older one is a replay, a newer one a
reordered or dropped record. A :class:`ChannelSession` closes itself after any refusal.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shieldtune.errors import ChannelError

__all__ = [
    "PROTOCOL",
    "PUBLIC_KEY_BYTES",
    "NONCE_BYTES",
    "REPORT_DATA_BYTES",
    "Role",
    "KeyPair",
    "ClientHello",
    "ServerHello",
    "SessionKeys",
    "ChannelSession",
    "generate_keypair",
    "new_nonce",
    "report_data",
    "transcript_hash",
    "derive_session_keys",
    "seal_record",
    "open_record",
    "client_hello",
    "client_session",
    "enclave_accept",
]

PROTOCOL = b"shieldtune-channel-v1"
PUBLIC_KEY_BYTES = 32
NONCE_BYTES = 32
REPORT_DATA_BYTES = 64
_KEY_BYTES = 32
_IV_PREFIX_BYTES = 4
_TAG_BYTES = 16
_RECORD_MAGIC = b"STCR"
_HELLO_MAGIC = b"STCH"
_VERSION = 1
_RECORD_HEADER = struct.Struct(">4sBBQ")
_MAX_SEQ = 2**64 - 1
_DIRECTIONS = {"client": (1, 2), "enclave": (2, 1)}  # role -> (send direction, receive direction)

Role = Literal["client", "enclave"]


@dataclass(frozen=True)
class KeyPair:
    """An ephemeral X25519 key pair.

    Attributes:
        private: The private key (never leaves the party that generated it).
        public: The raw 32-byte public key.
    """

    private: X25519PrivateKey = field(repr=False)
    public: bytes


@dataclass(frozen=True)
class ClientHello:
    """First handshake message: the client's ephemeral public key and its fresh nonce."""

    client_public: bytes
    nonce: bytes

    def to_bytes(self) -> bytes:
        """Serialise as ``"STCH" || 1 || 1 || C || n`` (70 bytes)."""
        return _HELLO_MAGIC + bytes([_VERSION, 1]) + self.client_public + self.nonce

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientHello:
        """Parse a client hello.

        Raises:
            ChannelError: Wrong magic, version, type or length.
        """
        _check_hello(data, 1, exact=6 + PUBLIC_KEY_BYTES + NONCE_BYTES)
        return cls(client_public=data[6:38], nonce=data[38:70])


@dataclass(frozen=True)
class ServerHello:
    """Second handshake message: the enclave's ephemeral public key and its attestation evidence."""

    enclave_public: bytes
    evidence: bytes

    def to_bytes(self) -> bytes:
        """Serialise as ``"STCH" || 1 || 2 || E || len(evidence) (u32 BE) || evidence``."""
        return (
            _HELLO_MAGIC
            + bytes([_VERSION, 2])
            + self.enclave_public
            + struct.pack(">I", len(self.evidence))
            + self.evidence
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ServerHello:
        """Parse a server hello.

        Raises:
            ChannelError: Wrong magic, version, type or length.
        """
        _check_hello(data, 2, exact=None)
        (n,) = struct.unpack_from(">I", data, 38)
        if len(data) != 42 + n:
            raise ChannelError(
                f"server hello declares {n} evidence bytes, carries {len(data) - 42}"
            )
        return cls(enclave_public=data[6:38], evidence=data[42:])


def _check_hello(data: bytes, kind: int, exact: int | None) -> None:
    minimum = exact if exact is not None else 42
    if len(data) < minimum or (exact is not None and len(data) != exact):
        raise ChannelError(f"handshake message has {len(data)} bytes, expected {minimum}")
    if data[:4] != _HELLO_MAGIC or data[4] != _VERSION or data[5] != kind:
        raise ChannelError(
            f"not a version-{_VERSION} handshake message of type {kind} "
            f"(got magic {data[:4]!r}, version {data[4]}, type {data[5]})"
        )


@dataclass(frozen=True)
class SessionKeys:
    """Per-direction AEAD keys and nonce prefixes of a session (see :func:`derive_session_keys`)."""

    send_key: bytes = field(repr=False)
    send_iv: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)
    recv_iv: bytes = field(repr=False)
    send_direction: int
    recv_direction: int
    transcript: bytes


def generate_keypair() -> KeyPair:
    """Generate an ephemeral X25519 key pair from the OS CSPRNG."""
    private = X25519PrivateKey.generate()
    return KeyPair(private=private, public=private.public_key().public_bytes_raw())


def new_nonce() -> bytes:
    """Return a fresh 32-byte nonce from the OS CSPRNG."""
    return os.urandom(NONCE_BYTES)


def _check_len(name: str, value: bytes, n: int) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != n:
        got = len(value) if isinstance(value, (bytes, bytearray)) else type(value).__name__
        raise ChannelError(f"{name} must be {n} bytes, got {got}")


def report_data(enclave_public: bytes, client_nonce: bytes, client_public: bytes) -> bytes:
    """The 64 bytes an enclave puts in its quote: SHA-512(E || n || C).

    All three inputs have fixed lengths, so the concatenation is unambiguous.

    Args:
        enclave_public: The enclave's 32-byte X25519 public key.
        client_nonce: The client's 32-byte nonce.
        client_public: The client's 32-byte X25519 public key.

    Returns:
        64 bytes of report data.

    Raises:
        ChannelError: An input has the wrong length.
    """
    _check_len("enclave public key", enclave_public, PUBLIC_KEY_BYTES)
    _check_len("client nonce", client_nonce, NONCE_BYTES)
    _check_len("client public key", client_public, PUBLIC_KEY_BYTES)
    return hashlib.sha512(enclave_public + client_nonce + client_public).digest()


def transcript_hash(client_public: bytes, client_nonce: bytes, enclave_public: bytes) -> bytes:
    """SHA-256 over the protocol label and both hellos' key material (32 bytes)."""
    _check_len("client public key", client_public, PUBLIC_KEY_BYTES)
    _check_len("client nonce", client_nonce, NONCE_BYTES)
    _check_len("enclave public key", enclave_public, PUBLIC_KEY_BYTES)
    return hashlib.sha256(PROTOCOL + client_public + client_nonce + enclave_public).digest()


def derive_session_keys(
    own: KeyPair, peer_public: bytes, transcript: bytes, role: Role
) -> SessionKeys:
    """Derive both directions' keys from the X25519 secret, bound to the transcript hash.

    Args:
        own: This party's ephemeral key pair.
        peer_public: The other party's 32-byte public key.
        transcript: :func:`transcript_hash` of the handshake.
        role: ``"client"`` or ``"enclave"`` (decides which direction is "send").

    Returns:
        The session keys.

    Raises:
        ChannelError: Bad key length, unknown role, or a low-order peer key.
    """
    _check_len("peer public key", peer_public, PUBLIC_KEY_BYTES)
    if role not in _DIRECTIONS:
        raise ChannelError(f"role {role!r} is unknown; accepted: client, enclave")
    try:
        shared = own.private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:  # all-zero shared secret: a low-order point
        raise ChannelError(f"key exchange refused the peer public key: {err}") from None
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=2 * (_KEY_BYTES + _IV_PREFIX_BYTES),
        salt=transcript,
        info=PROTOCOL + b" record keys",
    ).derive(shared)
    k, p = _KEY_BYTES, _IV_PREFIX_BYTES
    c2e = (okm[:k], okm[k : k + p])
    e2c = (okm[k + p : 2 * k + p], okm[2 * k + p :])
    send, recv = (c2e, e2c) if role == "client" else (e2c, c2e)
    send_dir, recv_dir = _DIRECTIONS[role]
    return SessionKeys(send[0], send[1], recv[0], recv[1], send_dir, recv_dir, transcript)


def seal_record(
    key: bytes, iv_prefix: bytes, direction: int, seq: int, plaintext: bytes
) -> bytearray:
    """Encrypt one record.

    Args:
        key: 32-byte AES key of this direction.
        iv_prefix: 4-byte nonce prefix of this direction.
        direction: 1 (client to enclave) or 2 (enclave to client).
        seq: Sequence number, used once per key (the caller counts).
        plaintext: The payload (typically a :mod:`~shieldtune.crypto.framing` frame).

    Returns:
        ``header || ciphertext || tag``.

    Raises:
        ChannelError: ``seq`` outside 0..2^64-1.
    """
    if not 0 <= seq <= _MAX_SEQ:
        raise ChannelError(f"sequence number {seq} is outside 0..2^64-1; start a new session")
    header = _RECORD_HEADER.pack(_RECORD_MAGIC, _VERSION, direction, seq)
    nonce = iv_prefix + struct.pack(">Q", seq)
    record = bytearray(len(header) + len(plaintext) + _TAG_BYTES)
    record[: len(header)] = header
    AESGCM(key).encrypt_into(nonce, plaintext, header, memoryview(record)[len(header) :])
    return record


def open_record(
    key: bytes, iv_prefix: bytes, direction: int, expected_seq: int, record: bytes
) -> bytearray:
    """Authenticate and decrypt one record that must carry ``expected_seq``.

    Args:
        key: 32-byte AES key of this direction.
        iv_prefix: 4-byte nonce prefix of this direction.
        direction: The direction this receiver accepts.
        expected_seq: The next sequence number the receiver expects.
        record: Bytes from :func:`seal_record`.

    Returns:
        The plaintext.

    Raises:
        ChannelError: Malformed header, wrong direction, failed authentication (tampered or
            wrong key), replayed (old sequence number) or reordered/dropped (newer one) record.
    """
    if len(record) < _RECORD_HEADER.size + _TAG_BYTES:
        raise ChannelError(f"channel record truncated: {len(record)} bytes")
    magic, version, rec_dir, seq = _RECORD_HEADER.unpack_from(record, 0)
    if magic != _RECORD_MAGIC or version != _VERSION:
        raise ChannelError(f"not a version-{_VERSION} channel record (magic {magic!r}, v{version})")
    if rec_dir != direction:
        raise ChannelError(
            f"record direction {rec_dir} where {direction} is expected: reflected record"
        )
    header = bytes(record[: _RECORD_HEADER.size])
    nonce = iv_prefix + struct.pack(">Q", seq)
    plaintext = bytearray(len(record) - _RECORD_HEADER.size - _TAG_BYTES)
    try:
        body = memoryview(record)[_RECORD_HEADER.size :]
        AESGCM(key).decrypt_into(nonce, body, header, plaintext)
    except InvalidTag:
        raise ChannelError(
            f"channel record seq {seq} failed authentication: tampered in transit or wrong key"
        ) from None
    if seq < expected_seq:
        raise ChannelError(
            f"channel record seq {seq} was already received (next is "
            f"{expected_seq}): replayed record"
        )
    if seq > expected_seq:
        raise ChannelError(
            f"channel record seq {seq} arrived while {expected_seq} was expected: "
            "reordered or dropped record"
        )
    return plaintext


class ChannelSession:
    """One side of an established channel: keys plus the two sequence counters.

    The session refuses everything after its first refusal (``closed`` says why), as TLS does.

    Args:
        keys: From :func:`derive_session_keys`.
    """

    def __init__(self, keys: SessionKeys) -> None:
        self._keys = keys
        self.send_seq = 0
        self.recv_seq = 0
        self.closed: str | None = None

    @property
    def transcript(self) -> bytes:
        """The handshake transcript hash the keys are bound to."""
        return self._keys.transcript

    def seal(self, plaintext: bytes) -> bytearray:
        """Encrypt the next outgoing record.

        Raises:
            ChannelError: The session is closed or its sequence numbers are exhausted.
        """
        self._check_open()
        k = self._keys
        record = seal_record(k.send_key, k.send_iv, k.send_direction, self.send_seq, plaintext)
        self.send_seq += 1
        return record

    def open(self, record: bytes) -> bytearray:
        """Authenticate and decrypt the next incoming record.

        Raises:
            ChannelError: The record was refused (the session then closes) or the session is
                already closed.
        """
        self._check_open()
        k = self._keys
        try:
            plaintext = open_record(k.recv_key, k.recv_iv, k.recv_direction, self.recv_seq, record)
        except ChannelError as err:
            self.closed = str(err)
            raise
        self.recv_seq += 1
        return plaintext

    def _check_open(self) -> None:
        if self.closed is not None:
            raise ChannelError(f"channel session is closed after: {self.closed}")


def client_hello(nonce: bytes | None = None) -> tuple[KeyPair, ClientHello]:
    """Start a handshake on the client: a fresh key pair and nonce.

    Args:
        nonce: The 32-byte nonce to use (e.g. from the verifier's nonce registry); a fresh
            random one if None.

    Returns:
        The client's key pair (keep it) and the hello to send.

    Raises:
        ChannelError: ``nonce`` is not 32 bytes.
    """
    nonce = new_nonce() if nonce is None else nonce
    _check_len("client nonce", nonce, NONCE_BYTES)
    keys = generate_keypair()
    return keys, ClientHello(client_public=keys.public, nonce=nonce)


def client_session(keys: KeyPair, hello: ClientHello, enclave_public: bytes) -> ChannelSession:
    """Finish the handshake on the client, after the evidence was verified.

    Verify first that the evidence's report data equals
    ``report_data(enclave_public, hello.nonce, hello.client_public)``.

    Returns:
        The client's session.
    """
    transcript = transcript_hash(hello.client_public, hello.nonce, enclave_public)
    return ChannelSession(derive_session_keys(keys, enclave_public, transcript, "client"))


def enclave_accept(hello: ClientHello) -> tuple[bytes, bytes, ChannelSession]:
    """Answer a client hello inside the enclave.

    Args:
        hello: The client's hello.

    Returns:
        ``(enclave_public, report_data, session)``: the public key for the server hello, the 64
        bytes to put in the quote, and the enclave's session.

    Raises:
        ChannelError: A malformed hello or a low-order client key.
    """
    keys = generate_keypair()
    rd = report_data(keys.public, hello.nonce, hello.client_public)
    transcript = transcript_hash(hello.client_public, hello.nonce, keys.public)
    session = ChannelSession(derive_session_keys(keys, hello.client_public, transcript, "enclave"))
    return keys.public, rd, session
