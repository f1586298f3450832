"""Shielded fixtures: a throw-away simulated platform, real accelerator workers, tiny parties."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shieldtune.shielded.worker import AcceleratorProcess
from shieldtune.tee.backends.simulated import PLATFORM_KEY_ENV


@pytest.fixture(scope="session")
def platform_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A temporary simulated platform key, also used by the recipe (through its env var)."""
    key = tmp_path_factory.mktemp("platform") / "sim_platform_key"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PLATFORM_KEY_ENV, str(key))
        yield key


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Callable[..., AcceleratorProcess]]:
    """Start real accelerator worker processes (stopped at the end of the test)."""
    started: list[AcceleratorProcess] = []

    def start(**kwargs: Any) -> AcceleratorProcess:
        kwargs.setdefault("audit", tmp_path / f"accel{len(started)}.jsonl")
        proc = AcceleratorProcess(**kwargs).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
