"""Split fixtures: a learnable keyword table, a throw-away simulated platform, a gRPC tap."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _tiny import write_keyword_table

from shieldtune.attacks.views import WireTap
from shieldtune.tee.backends.simulated import PLATFORM_KEY_ENV


@pytest.fixture(scope="session")
def platform_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A temporary simulated platform key, also used by the recipe (through its env var)."""
    key = tmp_path_factory.mktemp("platform") / "sim_platform_key"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PLATFORM_KEY_ENV, str(key))
        yield key


@pytest.fixture(scope="session")
def keyword_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared learnable table, 64 rows (the fidelity runs are step-for-step anyway)."""
    return write_keyword_table(tmp_path_factory.mktemp("data") / "kw.csv", rows=64)


# --------------------------------------------------------------------------- a live service
LIMIT = 1 << 20  # gRPC messages above 1 MiB are refused (the oversized-frame test)


@pytest.fixture(scope="session")
def tiny_program() -> dict[str, Any]:
    """The split-server config of the service tests: tiny-llama, cut 2, LoRA rank 4."""
    from types import SimpleNamespace

    from shieldtune.split.service import program_config

    train = SimpleNamespace(
        weight_decay=0.0, grad_clip=1.0, schedule="constant", warmup_ratio=0.0, precision="float32"
    )
    return program_config(
        model="tiny-llama",
        task="seq-cls",
        num_labels=2,
        cut=2,
        adapter={"method": "lora", "rank": 4},
        lr=0.01,
        train=train,
        seed=0,
        total_steps=100,
        allow_export=True,
    )


@pytest.fixture(scope="session")
def tap() -> WireTap:
    """The attack suite's tap on the relay: exactly the host operator's view of the traffic."""
    return WireTap()


@pytest.fixture(scope="session")
def audit() -> Any:
    from shieldtune.tee.audit import AuditLog

    return AuditLog()


@pytest.fixture(scope="session")
def split_service(
    tiny_program: dict[str, Any], platform_key: Path, tap: WireTap, audit: Any
) -> Iterator[Any]:
    """One split-server enclave behind a loopback gRPC relay, shared by the service tests."""
    from shieldtune.split.service import SplitService
    from shieldtune.transport.grpc_server import RelayLimits

    limits = RelayLimits(max_message_bytes=LIMIT, idle_timeout_s=30.0, max_sessions=16)
    service = SplitService(
        tiny_program, platform_key=platform_key, audit=audit, limits=limits, interceptors=[tap]
    )
    with service:
        yield service


@pytest.fixture(scope="session")
def make_batch() -> Callable[..., dict[str, torch.Tensor]]:
    return tiny_batch


def tiny_batch(seed: int = 0, batch: int = 4, seq: int = 10) -> dict[str, torch.Tensor]:
    """Random byte-token ids with right padding and binary labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 200, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, seq - 3 :] = 0
    ids[mask == 0] = 0
    labels = torch.randint(0, 2, (batch,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------- several clients
@pytest.fixture(scope="session")
def multi_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smaller table for the runs with several clients (32 training rows, 8 test rows)."""
    return write_keyword_table(tmp_path_factory.mktemp("data") / "kw40.csv", rows=40)


def multi_config(out: Path, table: Path, *extra: str) -> Any:
    """A split run of 2 tiny-llama clients, 2 rounds of 1 local epoch, SPF (gradient) + LoRA."""
    from _tiny import table_overrides

    from shieldtune.config import load_config

    return load_config(
        None,
        [
            *table_overrides(table),
            "data.max_length=32",
            "data.max_test_examples=8",
            "model.name=tiny-llama",
            "adapter={method: lora, rank: 4}",
            "split.cut=2",
            "split.front_adapter={method: spf, density: 0.05, saliency: gradient, "
            "warmup_batches: 2}",
            "split.clients=2",
            "split.allow_simulated=true",
            "federated.rounds=2",
            "federated.min_clients=2",
            "train.batch_size=8",
            "train.lr=0.003",
            f"output_dir={out}",
            *extra,
        ],
    )


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The run's metrics lines."""
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def client_losses(run: Path) -> dict[tuple[int, int, int], float]:
    """(client, round, step) -> loss of every split step of a federated split run."""
    return {
        (r["client"], r["round"], r["step"]): r["loss"]
        for r in read_metrics(run)
        if r["kind"] == "client_step"
    }
