"""Sealed state: measurement binding, tampering, rollback, atomic writes, and the enclave path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shieldtune.errors import SealingError
from shieldtune.tee.enclave import create_enclave
from shieldtune.tee.sealing import FileCounter, seal_blob, sealing_key, unseal_blob, write_atomic

SECRET = b"s" * 32
M1, M2 = "aa" * 32, "bb" * 32


def test_round_trip() -> None:
    key = sealing_key(SECRET, M1)
    assert unseal_blob(key, M1, 3, seal_blob(key, M1, 3, b"state")) == b"state"


def test_another_measurement_cannot_unseal() -> None:
    blob = seal_blob(sealing_key(SECRET, M1), M1, 1, b"state")
    with pytest.raises(SealingError, match="another enclave measurement"):
        unseal_blob(sealing_key(SECRET, M2), M2, 1, blob)
    # even a forged header naming M2 does not help: M2's key does not open M1's ciphertext
    forged = blob[:5] + seal_blob(sealing_key(SECRET, M2), M2, 1, b"")[5:37] + blob[37:]
    with pytest.raises(SealingError, match="failed authentication"):
        unseal_blob(sealing_key(SECRET, M2), M2, 1, forged)


def test_other_platform_and_tampering_are_refused() -> None:
    blob = bytearray(seal_blob(sealing_key(SECRET, M1), M1, 1, b"state"))
    with pytest.raises(SealingError, match="failed authentication"):
        unseal_blob(sealing_key(b"o" * 32, M1), M1, 1, bytes(blob))
    blob[-1] ^= 1
    with pytest.raises(SealingError, match="failed authentication"):
        unseal_blob(sealing_key(SECRET, M1), M1, 1, bytes(blob))
    with pytest.raises(SealingError, match="truncated"):
        unseal_blob(sealing_key(SECRET, M1), M1, 1, bytes(blob[:20]))


def test_rolled_back_copy_and_lost_counter_are_detected() -> None:
    key = sealing_key(SECRET, M1)
    old = seal_blob(key, M1, 1, b"round 1")
    with pytest.raises(SealingError, match="rolled-back copy"):
        unseal_blob(key, M1, 2, old)
    with pytest.raises(SealingError, match="ahead of the monotonic counter"):
        unseal_blob(key, M1, 0, old)


def test_round_is_authenticated() -> None:
    key = sealing_key(SECRET, M1)
    blob = bytearray(seal_blob(key, M1, 1, b"round 1"))
    blob[44] = 2  # last byte of the round field: claim round 2
    with pytest.raises(SealingError, match="failed authentication"):
        unseal_blob(key, M1, 2, bytes(blob))


def test_counter_only_grows(tmp_path: Path) -> None:
    counter = FileCounter(tmp_path / "c")
    assert counter.current() == 0
    counter.advance(1)
    with pytest.raises(SealingError, match="only grow"):
        counter.advance(1)
    (tmp_path / "c").write_text("garbage")
    with pytest.raises(SealingError, match="corrupt"):
        counter.current()


def test_write_atomic_replaces_and_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.sealed"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["state.sealed"]


def test_enclave_seals_survives_restart_refuses_rollback_and_other_measurement(
    tmp_path: Path,
) -> None:
    # Prepare
    key = tmp_path / "platform" / "key"
    path = tmp_path / "data" / "state.sealed"
    weights = torch.randn(4, 3)
    enc = create_enclave("simulated", "echo", {"model": "a"}, platform_key=key)
    with enc:
        enc.call("store", tensors={"lora_A": weights})
        assert enc.seal(path) == 1
        round1 = path.read_bytes()
        enc.call("store", tensors={"lora_B": torch.ones(2)})
        assert enc.seal(path) == 2
    # Execute: a new enclave process with the same measurement restores round 2
    with enc:
        assert enc.unseal(path) == 2
        state = enc.call("load").tensors
        torch.testing.assert_close(state["lora_A"], weights)
        # rollback: the host puts the round-1 copy back
        path.write_bytes(round1)
        with pytest.raises(SealingError, match="rolled-back copy"):
            enc.unseal(path)
        assert "lora_B" in enc.call("load").tensors  # state untouched by the refused unseal
    # another measurement (other config) cannot unseal
    other = create_enclave("simulated", "echo", {"model": "b"}, platform_key=key)
    write_atomic(path, round1)
    with other, pytest.raises(SealingError, match="another enclave measurement"):
        other.unseal(path)
