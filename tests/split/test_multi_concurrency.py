"""Concurrent split clients on one enclave over gRPC: every committed step counted once, a
client sending garbage is cut off while the others finish their round, and a client that
disconnects mid-step leaves its per_client adapter and the others' exactly as they were."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from shieldtune.errors import ChannelError
from shieldtune.recipes import split_clients
from shieldtune.recipes.split_federated import run_split_federated
from shieldtune.split.service import SplitService, connect, split_policy

from .conftest import client_losses, multi_config

pytestmark = pytest.mark.integration


def test_three_concurrent_clients_one_sending_garbage(
    tmp_path: Path, multi_table: Path, platform_key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: client 2 puts a garbage record on its stream before training
    fit = split_clients.SplitTrainer.fit
    refused: list[str] = []

    def fit_or_garbage(self: Any, state: dict, config: dict) -> Any:
        if self.partition == 2:
            transport = self.link.close.__self__  # the client's own gRPC transport
            try:
                transport.send(b"\x00garbage" * 8)
            except ChannelError as err:
                refused.append(str(err))
                raise
        return fit(self, state, config)

    monkeypatch.setattr(split_clients.SplitTrainer, "fit", fit_or_garbage)
    cfg = multi_config(
        tmp_path,
        multi_table,
        "mode=split",
        "run_name=c",
        "split.clients=3",
        "split.server_adapter=shared",
        "federated.rounds=1",
        "federated.workers=3",
    )
    # Execute: the three clients' messages are handled at once
    run = run_split_federated(cfg)
    # Assert: the garbage was refused and that client dropped; the other two finished the round
    summary = json.loads((run / "summary.json").read_text())
    assert refused and "INVALID_ARGUMENT" in refused[0]
    dropped = [e for e in summary["events"] if e["kind"] == "dropped"]
    assert {e["node"] for e in dropped} == {1002} and dropped[0]["round"] == 1
    assert summary["history"][0]["clients"] == 2
    losses = client_losses(run)
    assert {c for c, _, _ in losses} == {0, 1}
    # the shared adapter: every committed step of every client counted exactly once
    assert summary["client_steps"][2] == 0
    assert summary["server_steps"] == sum(summary["client_steps"]) == len(losses) > 0


def test_a_disconnect_mid_step_leaves_per_client_adapters_bit_identical(
    tiny_program: dict[str, Any], platform_key: Path, make_batch: Callable[..., dict]
) -> None:
    # Prepare: a per_client server enclave; client a trains and commits
    program = {**tiny_program, "server_adapter": "per_client"}
    with SplitService(program, platform_key=platform_key) as service:
        keys = [service.platform_public_key] if service.platform_public_key else []
        policy = split_policy(program, allow_simulated=True, simulated_platform_keys=keys)
        (a, _), (b, t_b) = connect(service.address, policy), connect(service.address, policy)
        a.init(), b.init()
        batch = make_batch()
        hidden = torch.randn(4, 10, 64, generator=torch.Generator().manual_seed(0))
        a.train_step(hidden, batch["attention_mask"], batch["labels"])
        a.commit()
        before_a = a.export_adapter()
        start = b.export_adapter()
        # Execute: b stages a step on its own adapter and vanishes before committing it
        b.train_step(hidden * 2, batch["attention_mask"], batch["labels"])
        t_b.disconnect()
        deadline = time.monotonic() + 20
        while service.relay.open_sessions > 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # the relay closes b's enclave session once it sees the stream end
        info = service.enclave.call("average").meta
        after_a = a.export_adapter()
    # Assert: a's adapter is untouched by b's half step and the average holds a's alone
    assert info["sessions"] == 1 and info["averaged"] == 1 and info["steps"] == 1
    for name, value in before_a.items():
        assert torch.equal(after_a[name], value), name
    assert any(not torch.equal(before_a[n], v) for n, v in start.items())  # a did train
