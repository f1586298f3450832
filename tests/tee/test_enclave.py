"""Simulated enclave: process isolation, ECALLs, budget, crashes, channel inside the enclave."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shieldtune.crypto.channel import ServerHello, generate_keypair
from shieldtune.crypto.framing import encode_frame
from shieldtune.errors import (
    AttestationError,
    ChannelError,
    ConfigError,
    EnclaveError,
    IntegrityError,
)
from shieldtune.tee.attestation import Policy, Verifier
from shieldtune.tee.audit import AuditLog
from shieldtune.tee.backends.simulated import PLATFORM_KEY_ENV, SimulatedPlatform
from shieldtune.tee.client import SecureClient, connect_local
from shieldtune.tee.enclave import create_enclave
from shieldtune.tee.process import ProcessEnclave
from shieldtune.tee.program import measure_program, measured_modules

BUDGET_MB = 1.0


@pytest.fixture(scope="module")
def platform_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("platform") / "sim_platform_key"


@pytest.fixture(scope="module")
def audit() -> AuditLog:
    return AuditLog()


@pytest.fixture(scope="module")
def enclave(platform_key: Path, audit: AuditLog) -> Iterator[ProcessEnclave]:
    enc = create_enclave(
        "simulated",
        "echo",
        {"role": "test"},
        platform_key=platform_key,
        memory_budget_mb=BUDGET_MB,
        audit=audit,
    )
    with enc:
        yield enc  # type: ignore[misc]


def _policy(enclave: ProcessEnclave) -> Policy:
    return Policy(
        allow_simulated=True,
        simulated_platform_keys=[enclave.platform.public_key_hex],  # type: ignore[attr-defined]
        allowed_measurements=[enclave.measurement],
    )


def test_runs_in_its_own_process_and_serves_ecalls(enclave: ProcessEnclave) -> None:
    # Execute
    info = enclave.call("info")
    out = enclave.call("sum", tensors={"x": torch.ones(3, 4)})
    # Assert
    assert info.meta["pid"] == enclave.pid != os.getpid()
    assert info.meta["simulated"] is True and info.meta["role"] == "test"
    torch.testing.assert_close(out.tensors["sum"], torch.tensor([12.0], dtype=torch.float64))


def test_measurement_covers_code_and_config(enclave: ProcessEnclave) -> None:
    loaded = enclave.call("info").meta["modules"]
    assert isinstance(loaded, list) and "shieldtune.tee.programs.echo" in loaded
    assert set(loaded) <= set(measured_modules("echo"))  # nothing unmeasured runs inside
    assert enclave.measurement == measure_program("echo", {"role": "test"})
    assert measure_program("echo", {"role": "other"}) != enclave.measurement
    assert len(enclave.measurement) == 64


def test_unknown_and_failing_ecalls_are_refused_and_the_enclave_keeps_serving(
    enclave: ProcessEnclave,
) -> None:
    with pytest.raises(EnclaveError, match="no ECALL 'steal_keys'; accepted: crash, echo"):
        enclave.call("steal_keys")
    with pytest.raises(EnclaveError, match="fail ECALL called"):
        enclave.call("fail")
    with pytest.raises(EnclaveError, match="reserved"):
        enclave.call("echo", {"op": "shutdown"})
    assert enclave.call("echo", {"still": "alive"}).meta == {"still": "alive"}


def test_unknown_program_and_backend_are_config_errors(platform_key: Path) -> None:
    with pytest.raises(ConfigError, match="unknown enclave program 'os.system'"):
        create_enclave("simulated", "os.system", platform_key=platform_key)
    with pytest.raises(ConfigError, match="unknown enclave backend 'sgx-magic'; accepted"):
        create_enclave("sgx-magic", "echo")


def test_memory_budget_is_enforced_and_reported(enclave: ProcessEnclave) -> None:
    # Execute
    with pytest.raises(EnclaveError, match="memory budget exceeded"):
        enclave.call("grow", {"nbytes": 2 * 2**20})
    with pytest.raises(EnclaveError, match="memory budget exceeded"):
        enclave.call("echo", tensors={"big": torch.zeros(2**20, dtype=torch.float32)})
    enclave.call("grow", {"nbytes": 1000})
    report = enclave.memory()
    # Assert
    assert report.budget_bytes == int(BUDGET_MB * 2**20)
    assert report.state_bytes >= 1000 and report.peak_bytes >= report.state_bytes
    assert report.max_rss_bytes > 0
    assert enclave.call("echo", {"ok": 1}).meta == {"ok": 1}


def test_simulated_label_hidden_platform_key_and_clean_shutdown(
    platform_key: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    caplog.set_level(logging.WARNING, logger="shieldtune.tee")
    monkeypatch.setenv(PLATFORM_KEY_ENV, str(platform_key))
    enc = create_enclave("simulated", "echo")
    # Execute
    with enc:
        environ = Path(f"/proc/{enc.pid}/environ").read_bytes()
        evidence = enc.quote(b"\x07" * 64, nonce=b"\x01" * 32)
        proc = enc._proc  # noqa: SLF001 - inspecting the exit status
    enc.stop()  # twice is fine
    # Assert: labelled, quotes say simulated and a strict verifier refuses them
    assert "SIMULATED enclave (no hardware protection)" in caplog.text
    assert evidence.kind == "simulated" and b'"simulated":true' in evidence.quote
    with pytest.raises(AttestationError, match="SIMULATED"):
        Verifier(Policy()).verify(evidence, expected_report_data=b"\x07" * 64)
    # the enclave never learns where the platform key is; it exited cleanly
    assert PLATFORM_KEY_ENV.encode() not in environ
    assert SimulatedPlatform().key_path == platform_key
    assert proc is not None and proc.returncode == 0 and not enc.alive


def test_crash_and_kill_mid_call_give_a_clear_error(platform_key: Path) -> None:
    enc = create_enclave("simulated", "echo", platform_key=platform_key)
    with enc:
        with pytest.raises(EnclaveError, match=r"died during 'crash' \(exit code 7\)"):
            enc.call("crash", {"code": 7})
        with pytest.raises(EnclaveError, match="not running"):
            enc.call("empty")
        enc.start()  # a crashed enclave can be started again
        pid = enc.pid
        assert pid is not None
        killer = threading.Timer(0.3, os.kill, (pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(EnclaveError, match=r"died during 'sleep' \(killed by signal 9\)"):
            enc.call("sleep", {"seconds": 30})
        killer.join()
        enc.start()
        with pytest.raises(EnclaveError, match="did not answer 'sleep' within 0.3 s"):
            enc.call("sleep", {"seconds": 30}, timeout=0.3)
        assert not enc.alive


# --------------------------------------------------------------------------- channel in the enclave


def test_channel_ends_inside_the_enclave_host_sees_ciphertext_only(
    enclave: ProcessEnclave, audit: AuditLog
) -> None:
    # Prepare
    client, _ = connect_local(enclave, Verifier(_policy(enclave)))
    start = len(audit.records)
    secret = torch.arange(10, dtype=torch.float32)
    # Execute
    out = client.call("sum", tensors={"patient_hidden": secret, "x": secret})
    # Assert
    assert out.tensors["sum"].item() == 45.0
    crossings = audit.records[start:]
    assert crossings and all(c.protection == "encrypted" for c in crossings)
    assert all(t.name == "record" for c in crossings for t in c.tensors)
    audit.assert_nothing_clear("patient_*")
    enclave.call("echo", tensors={"patient_hidden": secret})
    with pytest.raises(IntegrityError, match="in the clear"):
        audit.assert_nothing_clear("patient_*")


def test_server_hello_binds_the_enclave_key_in_the_quote(enclave: ProcessEnclave) -> None:
    client, _ = connect_local(enclave, Verifier(_policy(enclave)))
    assert client.quote.simulated and client.quote.measurement == enclave.measurement


def test_host_substituting_its_own_key_is_refused(enclave: ProcessEnclave) -> None:
    # A malicious host answers the hello with a key it controls and a quote for another handshake.
    def mitm(hello: bytes) -> bytes:
        _, genuine = enclave.open_channel(hello)
        evidence = ServerHello.from_bytes(genuine).evidence
        return ServerHello(generate_keypair().public, evidence).to_bytes()

    with pytest.raises(AttestationError, match="binds another key"):
        SecureClient.connect(Verifier(_policy(enclave)), mitm, lambda r: r)


def test_ecall_errors_travel_encrypted(enclave: ProcessEnclave, audit: AuditLog) -> None:
    client, _ = connect_local(enclave, Verifier(_policy(enclave)))
    start = len(audit.records)
    with pytest.raises(EnclaveError, match="fail ECALL called"):
        client.call("fail")
    assert all(c.protection == "encrypted" for c in audit.records[start:])
    assert client.call("sum", tensors={"x": torch.ones(2)}).tensors["sum"].item() == 2.0


def test_tampered_replayed_reordered_records_are_refused_other_sessions_keep_working(
    enclave: ProcessEnclave,
) -> None:
    policy = _policy(enclave)
    a, sid_a = connect_local(enclave, Verifier(policy))
    b, sid_b = connect_local(enclave, Verifier(policy))
    c, sid_c = connect_local(enclave, Verifier(policy))
    d, sid_d = connect_local(enclave, Verifier(policy))
    untouched, _ = connect_local(enclave, Verifier(policy))
    frame = encode_frame({"ecall": "empty"})
    # tampered
    record = bytearray(a._session.seal(frame))  # noqa: SLF001 - crafting wire records
    record[-3] ^= 0x10
    with pytest.raises(ChannelError, match="failed authentication"):
        enclave.relay(sid_a, bytes(record))
    with pytest.raises(ChannelError, match="no open channel session"):
        enclave.relay(sid_a, a._session.seal(frame))  # noqa: SLF001
    # replayed
    first = b._session.seal(frame)  # noqa: SLF001
    enclave.relay(sid_b, first)
    with pytest.raises(ChannelError, match="replayed"):
        enclave.relay(sid_b, first)
    # reordered
    c._session.seal(frame)  # noqa: SLF001 - held back by the host
    with pytest.raises(ChannelError, match="reordered"):
        enclave.relay(sid_c, c._session.seal(frame))  # noqa: SLF001
    # a record of one session relayed into another
    with pytest.raises(ChannelError, match="failed authentication"):
        enclave.relay(sid_d, b._session.seal(frame))  # noqa: SLF001
    # the untouched session and new sessions keep working
    assert untouched.call("echo", {"v": 1}).meta == {"v": 1}
    e, _ = connect_local(enclave, Verifier(policy))
    assert e.call("echo", {"v": 2}).meta == {"v": 2}
    assert enclave.memory().sessions >= 1
