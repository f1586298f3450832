"""Recipes ``plain-fedavg`` and ``secure-fedavg``: federated fine-tuning as a Flower simulation.

setup -> train -> save -> cleanup. N clients (Flower ClientApp nodes) each fine-tune the adapter
on their share of the training split for ``federated.local_epochs`` per round; the server
averages the updates weighted by sample counts; every round the clients evaluate the new global
adapter on their share of the held-out test split, and the sample-weighted mean is the global
test metric (one ``eval`` line per round in ``metrics.jsonl``).

secure-fedavg is the same code with two wrappers added: the clients' ``SealedUpdateMod`` and the
server's ``EnclaveAggregation`` around the same strategy. The global adapter then exists only
inside the server enclave and the clients; the run folder holds the enclave's sealed state, the
boundary audit log, and the adapter as client 0 received it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context

from shieldtune.config import RunConfig, adapter_settings
from shieldtune.errors import ConfigError
from shieldtune.federated.client_app import AdapterTrainer, LocalTraining, build_client_app
from shieldtune.federated.partition import client_shares, take
from shieldtune.federated.server_app import build_server_app
from shieldtune.federated.simulation import run_simulation
from shieldtune.federated.strategy import ValidatedFedAvg
from shieldtune.recipes._common import open_run, prepare
from shieldtune.report import plot_metrics
from shieldtune.training import RunDir

__all__ = ["run_federated", "ENCLAVE_PROGRAM"]

ENCLAVE_PROGRAM = "fedavg"
_SECRET_NAMES = ("g:*", "u:*", "*lora_*", "*prefix*", "*.values", "*classifier*", "*score*")


def _settings(cfg: RunConfig, num_labels: int) -> LocalTraining:
    method, settings = adapter_settings(cfg.adapter, "adapter")
    if method == "spf" and settings.saliency == "gradient":
        raise ConfigError(
            "adapter.saliency: federated SPF needs the same mask on every client; use "
            "'magnitude' or 'random' (with the same seed), not 'gradient'"
        )
    t = cfg.train
    return LocalTraining(
        model=cfg.model.name,
        task=cfg.model.task,
        num_labels=num_labels if cfg.model.task == "seq-cls" else None,
        method=method,
        settings=settings,
        epochs=cfg.federated.local_epochs,
        batch_size=t.batch_size,
        eval_batch_size=t.eval_batch_size,
        lr=t.lr,
        train_cfg=t,
        seed=t.seed,
        precision=t.precision,
    )


def _logger(run: RunDir, cfg: RunConfig, on_progress: Callable[[dict[str, Any]], None] | None):
    """Turn strategy events into metrics lines, history and progress updates."""
    history: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    started = time.perf_counter()
    rounds = cfg.federated.rounds

    def on_event(event: dict[str, Any]) -> None:
        kind, rnd = event["kind"], event["round"]
        if kind == "eval":
            metrics = {k: v for k, v in event.items() if k not in ("kind", "round")}
            record = {"epoch": rnd, "step": rnd, **metrics}
            history.append(record)
            run.log(kind="eval", **record)
        elif kind == "aggregated":
            loss = event.get("train_loss", float("nan"))
            run.log(kind="train", epoch=rnd, step=rnd, loss=loss, accepted=event["accepted"])
            if on_progress:
                rate = rnd / max(time.perf_counter() - started, 1e-9)
                on_progress({"step": rnd, "total": rounds, "loss": loss, "samples_per_s": rate})
        else:
            events.append(event)
            run.log(**event)

    return on_event, history, events


def _secure_parts(cfg: RunConfig, run: RunDir, strategy: ValidatedFedAvg):
    """The server enclave, the wrapped strategy and the clients' mod (secure-fedavg)."""
    from shieldtune.federated.mods import SealedUpdateMod
    from shieldtune.federated.secure import EnclaveAggregation
    from shieldtune.tee.attestation import Policy, Verifier
    from shieldtune.tee.audit import AuditLog
    from shieldtune.tee.enclave import create_enclave
    from shieldtune.tee.program import measure_program

    f = cfg.federated
    config = {"max_update_bytes": int(f.max_update_mb * 2**20), "min_updates": f.min_clients}
    audit = AuditLog(run.path / "audit.jsonl")
    enclave = create_enclave(
        f.backend, ENCLAVE_PROGRAM, config, audit=audit, memory_budget_mb=f.enclave_memory_mb
    ).start()
    platform_key = getattr(enclave.platform, "public_key_hex", None)  # type: ignore[attr-defined]
    policy = Policy(
        allow_simulated=f.allow_simulated,
        simulated_platform_keys=[platform_key] if platform_key else [],
        # each client computes the measurement from its own copy of the code
        allowed_measurements=[measure_program(ENCLAVE_PROGRAM, config)],
    )
    wrapped = EnclaveAggregation(strategy, enclave, handshake_timeout_s=f.round_timeout_s)
    return enclave, audit, wrapped, SealedUpdateMod(lambda: Verifier(policy))


def run_federated(
    cfg: RunConfig, on_progress: Callable[[dict[str, Any]], None] | None = None
) -> Path:
    """Run plain-fedavg or secure-fedavg as a Flower simulation and write a run folder.

    Returns:
        The completed run folder.
    """
    # setup
    f, secure = cfg.federated, cfg.mode == "secure-fedavg"
    if secure and f.backend == "simulated" and not f.allow_simulated:
        raise ConfigError(
            "federated.allow_simulated: secure-fedavg on the 'simulated' backend gives NO "
            "hardware protection; set federated.allow_simulated=true to run it anyway"
        )
    prep = prepare(cfg)
    settings = _settings(cfg, prep.num_labels)
    labels = prep.train["labels"].tolist() if cfg.model.task == "seq-cls" else None
    n_train, n_test = int(prep.train["labels"].shape[0]), int(prep.test["labels"].shape[0])
    shares = client_shares(
        labels, n_train, n_test, f.num_clients, f.partition, f.alpha, f.partition_seed
    )

    def trainer_for(context: Context) -> AdapterTrainer:
        p = int(context.node_config["partition-id"])
        train_rows, test_rows = shares[p]
        return AdapterTrainer(settings, take(prep.train, train_rows), take(prep.test, test_rows), p)

    run = open_run(cfg)
    on_event, history, events = _logger(run, cfg, on_progress)
    strategy = ValidatedFedAvg(
        f.min_clients, f.fraction, int(f.max_update_mb * 2**20), on_event=on_event
    )
    enclave = audit = None
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    try:
        mods: list[Any] = []
        server_strategy: Any = strategy
        if secure:
            enclave, audit, server_strategy, mod = _secure_parts(cfg, run, strategy)
            mods = [mod]
        client_app = build_client_app(trainer_for, mods)
        server_app = build_server_app(server_strategy, f.rounds, f.round_timeout_s)
        # train
        flwr_log.setLevel(logging.WARNING)
        t0 = time.perf_counter()
        grid = run_simulation(server_app, client_app, f.num_clients, workers=f.workers)
        train_time = time.perf_counter() - t0
        # save
        extra: dict[str, Any] = {}
        trainers = client_app.trainers  # type: ignore[attr-defined]
        first = trainers[min(trainers)]
        first.save(run.path / "adapter")  # the global adapter, as client 0 holds it
        if enclave is not None and audit is not None:
            extra["sealed_round"] = enclave.seal(run.path / "server_state.sealed")
            for pattern in _SECRET_NAMES:
                audit.assert_nothing_clear(pattern)
            extra["audit_crossings"] = len(audit.records)
            extra["simulated_enclave"] = enclave.simulated
        plot_metrics(
            run.path / "metrics.jsonl",
            run.path / "curves.png",
            title=f"{cfg.mode} {settings.method} · {cfg.model.name} · {f.num_clients} clients",
        )
    except BaseException:
        run.abort()
        raise
    finally:
        flwr_log.setLevel(level)
        if enclave is not None:
            enclave.stop()
    # cleanup
    to_client = [t.nbytes for t in grid.traffic if t.direction == "to_client"]
    to_server = [t.nbytes for t in grid.traffic if t.direction == "to_server"]
    per_round = f.num_clients * f.rounds
    final = history[-1] if history else {}
    return run.finish(
        {
            "mode": cfg.mode,
            "method": settings.method,
            "model": cfg.model.name,
            "dataset": prep.dataset.name,
            "clients": f.num_clients,
            "rounds": f.rounds,
            "partition": f.partition if f.partition == "iid" else f"dirichlet(alpha={f.alpha})",
            "train_rows": n_train,
            "test_rows": n_test,
            "client_train_rows": [len(s[0]) for s in shares],
            **{k: v for k, v in final.items() if k not in ("epoch", "step")},
            "steps": f.rounds,
            "train_time_s": round(train_time, 3),
            "round_time_s": round(train_time / f.rounds, 3),
            "bytes_to_client_per_round": round(sum(to_client) / per_round),
            "bytes_to_server_per_round": round(sum(to_server) / per_round),
            "events": events,
            "history": history,
            **extra,
        }
    )
