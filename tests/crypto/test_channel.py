"""Attested channel: handshake agreement, and every way a record must be refused."""

from __future__ import annotations

import hashlib

import pytest

from shieldtune.crypto.channel import (
    ChannelSession,
    ClientHello,
    ServerHello,
    client_hello,
    client_session,
    derive_session_keys,
    enclave_accept,
    generate_keypair,
    open_record,
    report_data,
    seal_record,
    transcript_hash,
)
from shieldtune.errors import ChannelError


def _pair() -> tuple[ChannelSession, ChannelSession]:
    keys, hello = client_hello()
    wire = ClientHello.from_bytes(hello.to_bytes())
    enclave_public, _, enclave = enclave_accept(wire)
    client = client_session(keys, hello, enclave_public)
    return client, enclave


def test_handshake_agrees_and_records_flow_both_ways() -> None:
    # Prepare
    client, enclave = _pair()
    # Execute
    up = [enclave.open(client.seal(f"up {i}".encode())) for i in range(3)]
    down = client.open(enclave.seal(b"down"))
    # Assert
    assert up == [b"up 0", b"up 1", b"up 2"] and down == b"down"
    assert client.transcript == enclave.transcript and len(client.transcript) == 32


def test_report_data_is_sha512_of_enclave_key_nonce_client_key() -> None:
    keys, hello = client_hello()
    enclave_public, rd, _ = enclave_accept(hello)
    assert rd == hashlib.sha512(enclave_public + hello.nonce + hello.client_public).digest()
    assert rd == report_data(enclave_public, hello.nonce, hello.client_public)
    assert len(rd) == 64
    other = generate_keypair().public
    assert report_data(other, hello.nonce, hello.client_public) != rd


def test_report_data_refuses_wrong_lengths() -> None:
    with pytest.raises(ChannelError, match="client nonce must be 32 bytes"):
        report_data(b"\x01" * 32, b"short", b"\x02" * 32)


def test_tampered_record_is_refused_and_closes_the_session() -> None:
    # Prepare
    client, enclave = _pair()
    record = bytearray(client.seal(b"secret"))
    record[-1] ^= 1
    # Execute / Assert
    with pytest.raises(ChannelError, match="failed authentication"):
        enclave.open(bytes(record))
    with pytest.raises(ChannelError, match="closed"):
        enclave.open(client.seal(b"next"))


def test_tampered_sequence_number_is_refused() -> None:
    client, enclave = _pair()
    record = bytearray(client.seal(b"x"))
    record[13] ^= 1  # last byte of the sequence number (authenticated as AAD)
    with pytest.raises(ChannelError, match="failed authentication"):
        enclave.open(bytes(record))


def test_replayed_record_is_refused() -> None:
    client, enclave = _pair()
    first = client.seal(b"one")
    enclave.open(first)
    with pytest.raises(ChannelError, match="replayed"):
        enclave.open(first)


def test_reordered_record_is_refused() -> None:
    client, enclave = _pair()
    client.seal(b"zero")  # dropped / held back by the relay
    second = client.seal(b"one")
    with pytest.raises(ChannelError, match="reordered"):
        enclave.open(second)


def test_reflected_record_is_refused() -> None:
    client, _ = _pair()
    with pytest.raises(ChannelError, match="reflected"):
        client.open(client.seal(b"mirror"))


def test_record_from_another_session_is_refused() -> None:
    client_a, _ = _pair()
    _, enclave_b = _pair()
    with pytest.raises(ChannelError, match="failed authentication"):
        enclave_b.open(client_a.seal(b"x"))


def test_keys_are_bound_to_the_transcript() -> None:
    # The same X25519 secret with another nonce in the transcript gives other keys.
    a, b = generate_keypair(), generate_keypair()
    th1 = transcript_hash(a.public, b"\x00" * 32, b.public)
    th2 = transcript_hash(a.public, b"\x01" * 32, b.public)
    k1 = derive_session_keys(a, b.public, th1, "client")
    k2 = derive_session_keys(a, b.public, th2, "client")
    peer = derive_session_keys(b, a.public, th1, "enclave")
    assert k1.send_key != k2.send_key
    assert k1.send_key == peer.recv_key and k1.recv_key == peer.send_key
    assert k1.send_key != k1.recv_key and k1.send_iv != k1.recv_iv


def test_low_order_peer_key_is_refused() -> None:
    with pytest.raises(ChannelError, match="refused the peer public key"):
        derive_session_keys(generate_keypair(), b"\x00" * 32, b"\x00" * 32, "client")


def test_unknown_role_and_bad_sequence_numbers_are_refused() -> None:
    a, b = generate_keypair(), generate_keypair()
    with pytest.raises(ChannelError, match="role"):
        derive_session_keys(a, b.public, b"t" * 32, "server")  # type: ignore[arg-type]
    with pytest.raises(ChannelError, match="outside"):
        seal_record(b"k" * 32, b"iv00", 1, 2**64, b"")


def test_malformed_records_and_hellos_are_refused() -> None:
    with pytest.raises(ChannelError, match="truncated"):
        open_record(b"k" * 32, b"iv00", 1, 0, b"STCR")
    with pytest.raises(ChannelError, match="not a version-1 channel record"):
        open_record(b"k" * 32, b"iv00", 1, 0, b"XXXX" + bytes(40))
    with pytest.raises(ChannelError, match="handshake"):
        ClientHello.from_bytes(b"STCH\x01\x01" + bytes(10))
    with pytest.raises(ChannelError, match="handshake"):
        ClientHello.from_bytes(ServerHello(b"e" * 32, b"").to_bytes())
    hello = ServerHello(b"e" * 32, b"evidence")
    assert ServerHello.from_bytes(hello.to_bytes()) == hello
    with pytest.raises(ChannelError, match="declares"):
        ServerHello.from_bytes(hello.to_bytes()[:-1])


def test_fresh_keys_and_nonces_each_time() -> None:
    (k1, h1), (k2, h2) = client_hello(), client_hello()
    assert h1.nonce != h2.nonce and k1.public != k2.public
