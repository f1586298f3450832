"""The split-server program with many sessions (in process): per_client adapters, their
average, shared commits, what each side may call, and what a closed session leaves behind."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from shieldtune.errors import ChannelError, EnclaveError
from shieldtune.split.client import SplitRemote
from shieldtune.split.local import LocalSplitServer


def _hidden(batch: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    b, t = batch["input_ids"].shape
    return torch.randn(b, t, 64, generator=torch.Generator().manual_seed(seed))


def _step(remote: SplitRemote, batch: dict[str, torch.Tensor], seed: int) -> float:
    loss, _ = remote.train_step(_hidden(batch, seed), batch["attention_mask"], batch["labels"])
    remote.commit()
    return loss


@pytest.fixture
def server_for(tiny_program: dict[str, Any]) -> Iterator[Callable[[str], LocalSplitServer]]:
    started: list[LocalSplitServer] = []

    def make(server_adapter: str) -> LocalSplitServer:
        server = LocalSplitServer({**tiny_program, "server_adapter": server_adapter}).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def _session(server: LocalSplitServer) -> tuple[SplitRemote, Callable[[], None]]:
    remote, close = server.connect()
    remote.init()
    return remote, close


def test_per_client_average_is_the_example_weighted_mean_of_the_sessions(
    server_for: Callable[[str], LocalSplitServer], make_batch: Callable[..., dict]
) -> None:
    # Prepare: two sessions train apart, on 2 × 4 rows and on 1 × 2 rows
    server = server_for("per_client")
    a, _ = _session(server)
    b, _ = _session(server)
    start = a.export_adapter()
    _step(a, make_batch(seed=0), 0)
    _step(b, make_batch(seed=1, batch=2), 1)
    _step(a, make_batch(seed=2), 2)
    own_a, own_b = a.export_adapter(), b.export_adapter()
    # Execute
    info = server.call("average").meta
    # Assert: separate adapters before, both the 8:2 mean after, and a new session starts there
    assert info["averaged"] == 2 and info["examples"] == 10 and info["steps"] == 3
    after_a, after_b = a.export_adapter(), b.export_adapter()
    late, _ = _session(server)
    joined = late.export_adapter()
    for name, value in start.items():
        assert not torch.equal(own_a[name], own_b[name]), name
        mean = (own_a[name].double() * 0.8 + own_b[name].double() * 0.2).to(value.dtype)
        torch.testing.assert_close(after_a[name], mean, atol=1e-7, rtol=0)
        assert torch.equal(after_a[name], after_b[name]) and torch.equal(
            joined[name], after_a[name]
        )
    # an average with no new steps changes nothing
    assert server.call("average").meta["averaged"] == 0
    assert all(torch.equal(a.export_adapter()[n], v) for n, v in after_a.items())


def test_swapping_sessions_is_exact(
    server_for: Callable[[str], LocalSplitServer],
    tiny_program: dict[str, Any],
    make_batch: Callable[..., dict],
) -> None:
    # Prepare: session a's two steps, interleaved with b's, vs the same two steps alone
    server = server_for("per_client")
    a, _ = _session(server)
    b, _ = _session(server)
    losses = [_step(a, make_batch(seed=0), 0)]
    _step(b, make_batch(seed=5), 5)
    losses.append(_step(a, make_batch(seed=1), 1))
    interleaved = a.export_adapter()
    server.stop()
    alone, _ = _session(server_for("per_client"))
    # Execute
    reference = [_step(alone, make_batch(seed=s), s) for s in (0, 1)]
    # Assert: bit for bit
    assert losses == reference
    for name, value in alone.export_adapter().items():
        assert torch.equal(interleaved[name], value), name


def test_shared_steps_commit_per_session_and_count_once(
    server_for: Callable[[str], LocalSplitServer], make_batch: Callable[..., dict]
) -> None:
    # Prepare
    server = server_for("shared")
    a, _ = _session(server)
    b, _ = _session(server)
    hidden, batch = _hidden(make_batch(), 0), make_batch()
    # Execute: interleaved staged steps; b tries to commit a's token
    a.train_step(hidden, batch["attention_mask"], batch["labels"])
    stolen = a.pending
    b.train_step(hidden, batch["attention_mask"], batch["labels"])
    b.pending = stolen
    with pytest.raises(ChannelError, match="unknown step token"):
        b.commit()
    b.pending = None  # b's own staged step is never committed
    steps = a.commit()
    # Assert: only a's step was applied; one shared adapter for both
    assert steps == 1
    assert all(torch.equal(a.export_adapter()[n], v) for n, v in b.export_adapter().items())
    assert server.call("average").meta["averaged"] == 0  # shared: nothing to average


def test_a_closed_session_leaves_every_adapter_as_it_was(
    server_for: Callable[[str], LocalSplitServer], make_batch: Callable[..., dict]
) -> None:
    for mode in ("shared", "per_client"):
        # Prepare: a keeps training; b stages a step and disconnects before committing it
        server = server_for(mode)
        a, _ = _session(server)
        b, close_b = _session(server)
        _step(a, make_batch(seed=0), 0)
        before = a.export_adapter()
        batch = make_batch(seed=3)
        b.train_step(_hidden(batch, 3), batch["attention_mask"], batch["labels"])
        # Execute
        close_b()
        info = server.call("average").meta
        # Assert: a's adapter is bit-identical (per_client: the average holds a's alone)
        after = a.export_adapter()
        assert all(torch.equal(after[n], v) for n, v in before.items()), mode
        assert info["averaged"] == (1 if mode == "per_client" else 0)
        server.stop()


def test_training_ecalls_need_a_channel_and_average_needs_the_host(
    server_for: Callable[[str], LocalSplitServer], make_batch: Callable[..., dict]
) -> None:
    server = server_for("per_client")
    batch = make_batch()
    tensors = {
        "hidden": _hidden(batch, 0),
        "attention_mask": batch["attention_mask"],
        "labels": batch["labels"],
    }
    server.call("init")
    for ecall in ("train_step", "grad_only", "export_adapter"):
        with pytest.raises(EnclaveError, match="only through a client's attested channel"):
            server.call(ecall, tensors=tensors if ecall != "export_adapter" else None)
    with pytest.raises(EnclaveError, match="reserved for the host"):
        server.call("average", session=7)
    with pytest.raises(ChannelError, match="takes no tensors"):
        server.call("average", tensors={"x": torch.zeros(1)})
