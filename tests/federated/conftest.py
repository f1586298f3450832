"""Fixtures: simulated ``fedavg`` enclaves with their audit logs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fedkit import ENCLAVE_CONFIG

from shieldtune.tee.audit import AuditLog
from shieldtune.tee.enclave import create_enclave


@pytest.fixture(scope="module")
def platform_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("platform") / "sim_platform_key"


@pytest.fixture
def enclave_factory(platform_key: Path) -> Iterator[Callable[..., Any]]:
    """Starts ``fedavg`` enclaves (stopped after the test) with an audit log each."""
    started = []

    def make(config: dict | None = None, program: str = "fedavg"):
        audit = AuditLog()
        enc = create_enclave(
            "simulated",
            program,
            config or ENCLAVE_CONFIG,
            platform_key=platform_key,
            audit=audit,
            memory_budget_mb=8,
        )
        enc.start()
        started.append(enc)
        return enc, audit

    yield make
    for enc in started:
        enc.stop()
