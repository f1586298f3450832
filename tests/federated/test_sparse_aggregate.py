"""Sparse (SPF) delta aggregation with optional DP: union support, weights, clipping, noise,
refusals; and the same aggregation inside the ``fedavg`` enclave on Flower."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from fedkit import client_policy, run_rounds

from shieldtune.adapters.spf import DeltaEntry, SparseDelta
from shieldtune.errors import ConfigError, EnclaveError, IntegrityError
from shieldtune.federated.aggregate import (
    screen_updates,
    sparse_fedavg,
    sparse_from_state,
    sparse_state,
)
from shieldtune.federated.strategy import SparseFedAvg
from shieldtune.tee.program import measured_modules

SHAPE = (4, 5)


def _delta(indices: list[int], values: list[float], name: str = "w") -> dict[str, torch.Tensor]:
    entry = DeltaEntry(torch.tensor(indices), torch.tensor(values), SHAPE)
    return sparse_state(SparseDelta({name: entry}))


def _dense(state: dict[str, torch.Tensor], name: str = "w") -> torch.Tensor:
    out = torch.zeros(math.prod(SHAPE), dtype=torch.float64)
    out[state[f"{name}.indices"]] = state[f"{name}.values"].double()
    return out


A = _delta([0, 2], [1.0, 2.0])
B = _delta([2, 3], [4.0, 8.0])


def test_state_round_trip_and_malformed_triples_are_refused() -> None:
    delta = sparse_from_state(A)
    assert isinstance(delta, SparseDelta) and delta.entries["w"].shape == SHAPE
    assert sparse_from_state({}).entries == {}  # the empty delta (no front adapter)
    for bad, match in [
        ({k: v for k, v in A.items() if not k.endswith(".shape")}, "triples"),
        ({**A, "w.shape": torch.tensor([4.0, 5.0])}, "1-D int64"),
        ({**A, "w.indices": torch.tensor([2, 0])}, "strictly increasing"),
        ({**A, "w.indices": torch.tensor([0, 99])}, "out of range"),
    ]:
        with pytest.raises(IntegrityError, match=match):
            sparse_from_state(bad)


def test_without_dp_it_is_the_weighted_mean_on_the_union_support() -> None:
    out = sparse_fedavg([(A, 1.0), (B, 3.0)])
    assert torch.equal(out["w.indices"], torch.tensor([0, 2, 3]))
    torch.testing.assert_close(out["w.values"], torch.tensor([0.25, 3.5, 6.0]))
    assert out["w.shape"].tolist() == list(SHAPE)


def test_a_binding_clip_scales_each_update_relative_to_the_previous_global() -> None:
    # Prepare: the previous global g, two clients' whole deltas d_j (their updates d_j - g)
    g = _delta([2, 7], [1.0, -1.0])
    d0 = _delta([0, 2, 7], [3.0, 1.0, -1.0])  # update (3 at 0): norm 3
    d1 = _delta([2, 7, 9], [1.0, -1.0, 4.0])  # update (4 at 9): norm 4
    # Execute: clip 2 binds on both; σ = 0
    out = sparse_fedavg([(d0, 1.0), (d1, 3.0)], g, clip=2.0, sigma=0.0)
    loose = sparse_fedavg([(d0, 1.0), (d1, 3.0)], g, clip=100.0, sigma=0.0)
    # Assert: new = g + (1/4)·2·(e0) + (3/4)·2·(e9); the support is the union with g's
    assert torch.equal(out["w.indices"], torch.tensor([0, 2, 7, 9]))
    expected = _dense(g)
    expected[0] += 0.25 * 2.0
    expected[9] += 0.75 * 2.0
    torch.testing.assert_close(_dense(out), expected)
    # a clip that does not bind gives plain FedAvg
    torch.testing.assert_close(_dense(loose), _dense(sparse_fedavg([(d0, 1.0), (d1, 3.0)])))


def test_noise_lands_only_on_the_union_support_and_differs_each_round() -> None:
    # Prepare
    g = _delta([1], [0.5])
    updates = [(A, 2.0), (B, 2.0)]
    # Execute: σ > 0 twice from the CSPRNG, once from a seeded generator
    first = sparse_fedavg(updates, g, clip=1.0, sigma=0.5)
    second = sparse_fedavg(updates, g, clip=1.0, sigma=0.5)
    seeded = [
        sparse_fedavg(updates, g, clip=1.0, sigma=0.5, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    clean = sparse_fedavg(updates, g, clip=1.0, sigma=0.0)
    # Assert: same support (A ∪ B ∪ g), other values, no entry outside it
    for out in (first, second):
        assert torch.equal(out["w.indices"], torch.tensor([0, 1, 2, 3]))
        assert not torch.equal(out["w.values"], clean["w.values"])
        outside = torch.ones(math.prod(SHAPE), dtype=torch.bool)
        outside[out["w.indices"]] = False
        assert bool((_dense(out)[outside] == 0).all())
    assert not torch.equal(first["w.values"], second["w.values"])
    assert torch.equal(seeded[0]["w.values"], seeded[1]["w.values"])
    # noise scale: σ·C·(largest weight share) = 0.5·1·0.5 per entry
    many = [sparse_fedavg(updates, g, clip=1.0, sigma=0.5) for _ in range(200)]
    spread = torch.stack([_dense(m)[:4] - _dense(clean)[:4] for m in many]).std()
    assert float(spread) == pytest.approx(0.25, rel=0.15)


@pytest.mark.parametrize(
    ("clip", "sigma", "match"),
    [
        (None, 1.0, "dp sigma is 1.0 but dp clip is not set"),
        (0.0, 0.0, "dp clip"),
        (1.0, -1, "dp sigma"),
    ],
)
def test_bad_dp_settings_are_refused(clip: Any, sigma: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        sparse_fedavg([(A, 1.0)], clip=clip, sigma=sigma)


def test_screening_keeps_good_and_empty_deltas_and_names_the_bad() -> None:
    nan = {**A, "w.values": torch.tensor([1.0, float("nan")])}
    accepted, refused = screen_updates(
        [(A, 1.0), ({}, 2.0), (nan, 1.0), (B, 0.0)], max_bytes=1024, sparse=True
    )
    assert accepted == [0, 1]
    assert "NaN" in refused[2] and "num_examples" in refused[3]
    _, big = screen_updates([(A, 1.0)], max_bytes=8, sparse=True)
    assert "oversized" in big[0]


# --------------------------------------------------------------------------- on Flower
SPARSE = "fedavg-sparse"
SPARSE_CONFIG = {"max_update_bytes": 4096, "min_updates": 2, "dp_clip": None, "dp_sigma": 0.0}
MASKS = {0: [0, 3, 7], 1: [3, 8], 2: [1, 19]}


class SparseTrainer:
    """Client p trains the entries MASKS[p]: its whole delta = global + (p + 1) there."""

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.seen: list[dict[str, torch.Tensor]] = []

    def fit(self, state: dict[str, torch.Tensor], config: dict[str, Any]):
        self.seen.append(dict(state))
        dense = _dense(state) if state else torch.zeros(20, dtype=torch.float64)
        idx = torch.tensor(MASKS[self.partition])
        dense[idx] += self.partition + 1
        support = torch.unique(torch.cat([idx, state.get("w.indices", idx)]))
        delta = _delta(support.tolist(), dense[support].float().tolist())
        return delta, 10 * (self.partition + 1), {"train_loss": 1.0}

    def evaluate(self, state: dict[str, torch.Tensor], config: dict[str, Any]):
        self.seen.append(dict(state))
        return 5, {"accuracy": 0.5}


def _sparse_trainers() -> tuple[Any, dict[int, SparseTrainer]]:
    built: dict[int, SparseTrainer] = {}

    def trainer_for(context: Any) -> SparseTrainer:
        p = int(context.node_config["partition-id"])
        built[p] = SparseTrainer(p)
        return built[p]

    return trainer_for, built


def test_the_fedavg_enclave_averages_sparse_deltas_as_the_plain_strategy(
    enclave_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: plain (SparseFedAvg) and secure (the enclave, sparse config) runs
    import fedkit

    plain_for, plain_built = _sparse_trainers()
    secure_for, secure_built = _sparse_trainers()
    enclave, audit = enclave_factory(SPARSE_CONFIG, SPARSE)
    monkeypatch.setattr(fedkit, "ValidatedFedAvg", SparseFedAvg)  # the plain sparse strategy
    on_wire: list[str] = []

    def tap(msg: Any) -> None:
        if msg.has_content():
            for rec in msg.content.array_records.values():
                on_wire.extend(str(a.numpy().dtype) for a in rec.values())

    # Execute
    run_rounds(plain_for, rounds=2)
    events, _, _ = run_rounds(
        secure_for,
        rounds=2,
        enclave=enclave,
        tap=tap,
        policy_for=lambda n: client_policy(enclave, SPARSE_CONFIG, SPARSE),
    )
    # Assert: every client received the same global deltas in both runs
    assert [e["round"] for e in events if e["kind"] == "aggregated"] == [1, 2]
    for p in MASKS:
        for got, want in zip(secure_built[p].seen, plain_built[p].seen, strict=True):
            assert set(got) == set(want)
            for name in want:
                torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)
    final = plain_built[0].seen[-1]
    assert torch.equal(final["w.indices"], torch.tensor([0, 1, 3, 7, 8, 19]))
    # Flower carried ciphertext only; the enclave boundary saw no delta in the clear
    assert set(on_wire) == {"uint8"}
    for name in ("*.values", "*.indices", "g:*", "u:*"):
        audit.assert_nothing_clear(name)
    # the host may not submit into the enclave, and every module it loaded is measured
    with pytest.raises(EnclaveError, match="only through a client's attested channel"):
        enclave.call("submit", {"client": "host", "round": 3, "num_examples": 1.0}, A)
    modules = enclave.call("status").meta["modules"]
    assert "shieldtune.adapters.spf.model" in modules
    assert set(modules) <= set(measured_modules(SPARSE))
    # the dense program measures no model code, and refuses DP settings it cannot honour
    assert not any(m.startswith("shieldtune.adapters") for m in measured_modules("fedavg"))
    dense, _ = enclave_factory({**SPARSE_CONFIG, "dp_clip": 1.0})
    with pytest.raises(EnclaveError, match="DP settings need the 'fedavg-sparse' program"):
        dense.call("aggregate", {"round": 1})
