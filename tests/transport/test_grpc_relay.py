"""gRPC relay in front of a simulated enclave: sessions, ciphertext only, refusals, limits."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from shieldtune.crypto.framing import encode_frame
from shieldtune.errors import ChannelError
from shieldtune.tee.attestation import Policy, Verifier
from shieldtune.tee.client import SecureClient
from shieldtune.tee.enclave import create_enclave
from shieldtune.tee.process import ProcessEnclave
from shieldtune.transport import InProcTransport
from shieldtune.transport.grpc_client import GrpcTransport
from shieldtune.transport.grpc_server import SESSION, RelayLimits, RelayServer

LIMITS = RelayLimits(
    max_message_bytes=256 * 1024, idle_timeout_s=1.5, handshake_timeout_s=1.0, max_sessions=6
)


@pytest.fixture(scope="module")
def enclave(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessEnclave]:
    key = tmp_path_factory.mktemp("platform") / "sim_platform_key"
    with create_enclave("simulated", "echo", platform_key=key) as enc:
        yield enc  # type: ignore[misc]


@pytest.fixture
def server(enclave: ProcessEnclave) -> Iterator[RelayServer]:
    with RelayServer(enclave, limits=LIMITS) as srv:
        yield srv


def _verifier(enclave: ProcessEnclave) -> Verifier:
    return Verifier(
        Policy(
            allow_simulated=True,
            simulated_platform_keys=[enclave.platform.public_key_hex],  # type: ignore[attr-defined]
            allowed_measurements=[enclave.measurement],
        )
    )


def _connect(enclave: ProcessEnclave, server: RelayServer) -> tuple[SecureClient, GrpcTransport]:
    transport = GrpcTransport(server.address, max_message_bytes=LIMITS.max_message_bytes)
    return SecureClient.connect(_verifier(enclave), transport.handshake, transport.send), transport


def test_calls_cross_the_relay_encrypted_and_the_session_closes_with_the_stream(
    enclave: ProcessEnclave, server: RelayServer
) -> None:
    # Execute
    client, transport = _connect(enclave, server)
    out = client.call("sum", tensors={"x": torch.ones(4, 4)})
    again = client.call("echo", {"v": 7})
    # Assert
    assert out.tensors["sum"].item() == 16.0 and again.meta == {"v": 7}
    assert transport.bytes_sent > 0 and server.open_sessions == 1
    transport.close()
    deadline = time.monotonic() + 5
    while server.open_sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.open_sessions == 0


def test_tampered_and_replayed_records_end_only_their_own_stream(
    enclave: ProcessEnclave, server: RelayServer
) -> None:
    # Prepare
    healthy, _ = _connect(enclave, server)
    victim, t_victim = _connect(enclave, server)
    replayer, t_replay = _connect(enclave, server)
    frame = encode_frame({"ecall": "empty"})
    # Execute / Assert: tampered
    record = bytearray(victim._session.seal(frame))  # noqa: SLF001 - crafting wire records
    record[-5] ^= 0x01
    with pytest.raises(ChannelError, match="INVALID_ARGUMENT.*failed authentication"):
        t_victim.send(bytes(record))
    # replayed: the same record twice on one stream
    first = replayer._session.seal(frame)  # noqa: SLF001
    t_replay.send(first)
    with pytest.raises(ChannelError, match="INVALID_ARGUMENT.*replayed"):
        t_replay.send(first)
    # a malformed record (not a channel record at all)
    _, t_garbage = _connect(enclave, server)
    with pytest.raises(ChannelError, match="INVALID_ARGUMENT.*not a version-1 channel record"):
        t_garbage.send(b"GARBAGE!" * 8)
    # the other session keeps working
    assert healthy.call("echo", {"ok": 1}).meta == {"ok": 1}


def test_oversized_message_is_refused_and_other_sessions_keep_working(
    enclave: ProcessEnclave, server: RelayServer
) -> None:
    healthy, _ = _connect(enclave, server)
    big, _ = _connect(enclave, server)
    with pytest.raises(ChannelError, match="RESOURCE_EXHAUSTED"):
        big.call("echo", tensors={"x": torch.zeros(128 * 1024)})  # 512 KiB > 256 KiB
    assert healthy.call("echo", {"ok": 2}).meta == {"ok": 2}


def test_stream_without_a_valid_token_is_refused(server: RelayServer) -> None:
    channel = grpc.insecure_channel(server.address)
    stream = channel.stream_stream(SESSION)
    with pytest.raises(grpc.RpcError) as info:
        list(stream(iter([b"x"]), metadata=(("x-shieldtune-session", "00" * 16),)))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def test_idle_stream_times_out_and_unused_handshakes_expire(
    enclave: ProcessEnclave, server: RelayServer
) -> None:
    client, transport = _connect(enclave, server)
    client.call("empty")
    time.sleep(LIMITS.idle_timeout_s + 0.5)
    with pytest.raises(ChannelError, match="DEADLINE_EXCEEDED.*idle_timeout_s"):
        client.call("empty")
    # a handshake whose stream never starts is forgotten after handshake_timeout_s
    _connect(enclave, server)
    time.sleep(LIMITS.handshake_timeout_s + 0.2)
    fresh, _ = _connect(enclave, server)
    assert server.open_sessions == 1
    assert fresh.call("echo", {"v": 3}).meta == {"v": 3}


def test_max_sessions_refuses_new_handshakes(enclave: ProcessEnclave, server: RelayServer) -> None:
    held = [_connect(enclave, server) for _ in range(LIMITS.max_sessions)]
    with pytest.raises(ChannelError, match="RESOURCE_EXHAUSTED.*max_sessions"):
        _connect(enclave, server)
    for _, transport in held:
        transport.close()


def test_inproc_transport_relays_the_same_way(enclave: ProcessEnclave) -> None:
    transport = InProcTransport(enclave)
    with pytest.raises(ChannelError, match="before handshake"):
        transport.send(b"x")
    client = SecureClient.connect(_verifier(enclave), transport.handshake, transport.send)
    assert client.call("echo", {"v": 4}).meta == {"v": 4}
    assert transport.bytes_sent > 0
    transport.close()
    transport.close()


def test_relay_counts_bytes_and_tells_a_closed_stream_from_a_broken_one(
    enclave: ProcessEnclave, server: RelayServer
) -> None:
    # Prepare: one client that closes its stream, one that drops the connection
    closing, t_closing = _connect(enclave, server)
    dropping, t_dropping = _connect(enclave, server)
    closing.call("echo", {"v": 1})
    dropping.call("echo", {"v": 2})
    # Execute
    t_closing.close()
    assert server.wait_streams(1, timeout_s=5)
    t_dropping.disconnect()
    # Assert: in the order the streams ended; a broken stream is never "finished"
    assert server.wait_streams(2, timeout_s=5)
    assert server.outcomes == ["finished", "dropped"]
    assert not server.wait_streams(3, timeout_s=0.1)
    sent = t_closing.bytes_sent + t_dropping.bytes_sent
    received = t_closing.bytes_received + t_dropping.bytes_received
    assert (server.bytes_in, server.bytes_out) == (sent, received)


def test_relay_over_tls_serves_only_clients_that_trust_its_ca(enclave: ProcessEnclave) -> None:
    # Prepare
    from shieldtune.crypto.tls import make_tls_material

    ours, theirs = make_tls_material(["127.0.0.1"]), make_tls_material(["127.0.0.1"])
    with RelayServer(enclave, limits=LIMITS, tls=(ours.server_cert, ours.server_key)) as srv:
        # Execute / Assert: the right CA talks to the enclave
        good = GrpcTransport(srv.address, root_certificates=ours.ca_cert, connect_timeout_s=5)
        client = SecureClient.connect(_verifier(enclave), good.handshake, good.send)
        assert client.call("echo", {"v": 3}).meta == {"v": 3}
        good.close()
        # another CA, or no TLS at all, never gets a handshake through
        for root in (theirs.ca_cert, None):
            bad = GrpcTransport(srv.address, root_certificates=root, connect_timeout_s=1)
            with pytest.raises(ChannelError, match="handshake failed"):
                SecureClient.connect(_verifier(enclave), bad.handshake, bad.send)
            bad.close()
