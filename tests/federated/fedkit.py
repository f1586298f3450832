"""Test kit: fast fake trainers and plain / secure FedAvg runs on Flower (in-process grid)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import Context

from shieldtune.federated.client_app import build_client_app
from shieldtune.federated.mods import SealedUpdateMod
from shieldtune.federated.secure import EnclaveAggregation
from shieldtune.federated.server_app import build_server_app
from shieldtune.federated.simulation import LocalGrid, run_simulation
from shieldtune.federated.strategy import ValidatedFedAvg
from shieldtune.tee.attestation import Policy, Verifier
from shieldtune.tee.program import measure_program

logging.getLogger("flwr").setLevel(logging.WARNING)

ENCLAVE_CONFIG = {"max_update_bytes": 4096, "min_updates": 2}


class FakeTrainer:
    """Adds ``partition + 1`` to every entry of the global state; n = 10 * (partition + 1).

    ``behaviour`` maps a round to what goes wrong in that round: ``raise``, ``hang``, ``nan``,
    ``shape``, ``huge``.
    """

    def __init__(self, partition: int, behaviour: dict[int, str] | None = None) -> None:
        self.partition = partition
        self.behaviour = behaviour or {}
        self.seen: list[dict[str, torch.Tensor]] = []

    def fit(self, state: dict[str, torch.Tensor], config: dict[str, Any]):
        base = state or {"w": torch.zeros(2, 3), "b": torch.zeros(4)}
        self.seen.append({k: v.clone() for k, v in base.items()})
        update = {k: v + (self.partition + 1) for k, v in base.items()}
        what = self.behaviour.get(int(config["server-round"]))
        if what == "raise":
            raise RuntimeError("client crashed mid-round")
        if what == "hang":
            time.sleep(4.0)
        if what == "nan":
            update["w"] = torch.full_like(update["w"], float("nan"))
        if what == "shape":
            update["w"] = torch.zeros(5, 5)
        if what == "huge":
            update["w"] = torch.zeros(2000)
        return update, 10 * (self.partition + 1), {"train_loss": float(self.partition)}

    def evaluate(self, state: dict[str, torch.Tensor], config: dict[str, Any]):
        self.seen.append({k: v.clone() for k, v in state.items()})
        return 5, {"accuracy": float(state["w"].mean()) if state else 0.0}


def fake_trainers(behaviours: dict[int, dict[int, str]] | None = None):
    """``trainer_for`` plus the dict of trainers it built (by partition)."""
    built: dict[int, FakeTrainer] = {}

    def trainer_for(context: Context) -> FakeTrainer:
        p = int(context.node_config["partition-id"])
        built[p] = FakeTrainer(p, (behaviours or {}).get(p))
        return built[p]

    return trainer_for, built


def client_policy(
    enclave, config: dict | None = None, program: str = "fedavg", **overrides
) -> Policy:
    """What a client trusts: the measurement it computes itself from its copy of the code."""
    fields = {
        "allow_simulated": True,
        "simulated_platform_keys": [enclave.platform.public_key_hex],
        "allowed_measurements": [measure_program(program, config or ENCLAVE_CONFIG)],
        **overrides,
    }
    return Policy(**fields)


def run_rounds(
    trainer_for,
    *,
    rounds: int = 2,
    num_nodes: int = 3,
    enclave=None,
    policy_for: Callable[[int], Policy] | None = None,
    min_clients: int = 2,
    timeout: float = 60.0,
    workers: int = 1,
    tap=None,
    max_update_bytes: int | None = 4096,
) -> tuple[list[dict], Any, LocalGrid]:
    """Run plain (no enclave) or secure FedAvg; return (events, Flower result, grid)."""
    events: list[dict] = []
    results: list[Any] = []
    strategy = ValidatedFedAvg(min_clients, 1.0, max_update_bytes, on_event=events.append)
    mods = []
    if enclave is not None:
        strategy = EnclaveAggregation(strategy, enclave)
        nodes: dict[int, int] = {}

        def verifier() -> Verifier:
            # the fake "client identity": nth handshake -> policy_for(n)
            n = len(nodes)
            nodes[n] = n
            return Verifier(policy_for(n) if policy_for else client_policy(enclave))

        mods = [SealedUpdateMod(verifier)]
    client_app = build_client_app(trainer_for, mods)
    server_app = build_server_app(strategy, rounds, timeout, on_result=results.append)
    grid = run_simulation(server_app, client_app, num_nodes, workers=workers, tap=tap)
    return events, results[0], grid
