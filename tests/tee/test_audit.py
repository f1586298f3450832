"""Boundary audit log: records, JSONL mirror and the nothing-clear assertion."""

from __future__ import annotations

from pathlib import Path

import pytest

from shieldtune.errors import IntegrityError
from shieldtune.tee.audit import AuditLog, TensorInfo


def _log(path: Path | None = None) -> AuditLog:
    log = AuditLog(path)
    log.record(
        enclave="e",
        direction="host->enclave",
        call="forward",
        nbytes=100,
        protection="masked",
        tensors=(TensorInfo("hidden", "int64", (2, 8)),),
    )
    log.record(
        enclave="e",
        direction="enclave->host",
        call="channel_call",
        nbytes=90,
        protection="encrypted",
        tensors=(TensorInfo("record", "uint8", (90,)),),
    )
    log.record(
        enclave="e",
        direction="host->enclave",
        call="init",
        nbytes=10,
        protection="clear",
        tensors=(TensorInfo("config", "uint8", (5,)),),
    )
    return log


def test_nothing_clear_passes_for_masked_and_encrypted() -> None:
    log = _log()
    log.assert_nothing_clear("hidden")
    log.assert_nothing_clear("record")
    assert log.clear_crossings("conf*")


def test_clear_crossing_is_reported() -> None:
    log = _log()
    log.record(
        enclave="e",
        direction="enclave->host",
        call="leak",
        nbytes=64,
        protection="clear",
        tensors=(TensorInfo("lora_A", "float32", (4, 4)),),
    )
    with pytest.raises(
        IntegrityError,
        match=r"1 crossing\(s\) carried 'lora_\*' in the clear: "
        r"enclave->host leak \(64 bytes\)",
    ):
        log.assert_nothing_clear("lora_*")


def test_jsonl_mirror_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = _log(path)
    assert AuditLog.read_jsonl(path) == log.records
    assert len(path.read_text().splitlines()) == 3


def test_bad_protection_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="protection"):
        AuditLog().record(
            enclave="e", direction="host->enclave", call="x", nbytes=1, protection="obfuscated"
        )  # type: ignore[arg-type]
