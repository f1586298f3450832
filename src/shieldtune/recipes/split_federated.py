"""Recipes ``split`` and ``plain-split`` with ``split.clients > 1``: federated split fine-tuning.

setup -> train -> save -> cleanup, on one machine. N split clients (Flower ClientApp nodes, each
a :class:`~shieldtune.recipes.split_clients.SplitTrainer` on its partition of the training split)
train against one split server concurrently, each over its own session, for
``federated.rounds`` rounds of ``federated.local_epochs``::

    round r:  every client: front := base + Δ_{r-1};  split steps on its share (server side:
                            the shared adapter, or its own per_client adapter);  reply Δ_j
              aggregation:  Δ_r = union-support FedAvg of the Δ_j (+ DP: clip, noise)
              split server: per_client adapters := their example-weighted mean
              evaluation:   every client: front := base + Δ_r, its test share through the server

``split`` (secure) puts the back slice in the ``split-server`` enclave behind the gRPC relay
(attested channel per client), and the aggregation in a ``fedavg-sparse`` enclave whose
measured config holds the DP settings; clients seal their deltas to it
(:class:`~shieldtune.federated.mods.SealedUpdateMod`) and Flower carries ciphertext only.
``plain-split`` is the same code with those wrappers removed: the same server program in this
process (:class:`~shieldtune.split.local.LocalSplitServer`), the same aggregation in the clear
(:class:`~shieldtune.federated.strategy.SparseFedAvg`). With the same seeds and
``server_adapter: per_client`` the two give the same losses step for step.

On machines without TEE hardware both enclaves are SIMULATED (no hardware protection): ``split``
refuses to start unless ``split.allow_simulated`` and says so in its logs and summary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Message

from shieldtune.config import RunConfig
from shieldtune.federated.client_app import LocalTraining, build_client_app
from shieldtune.federated.deploy import client_policy, enclave_config, enclave_program
from shieldtune.federated.partition import client_shares
from shieldtune.federated.server_app import build_server_app
from shieldtune.federated.simulation import run_simulation
from shieldtune.federated.strategy import AfterTrain, SparseFedAvg
from shieldtune.recipes._common import Prepared, open_run, passive_threads, prepare
from shieldtune.recipes.federated import node_trainer_factory, round_logger
from shieldtune.recipes.split_clients import Link, SplitSettings, SplitTrainer
from shieldtune.recipes.split_secure import (
    BACKEND,
    SEALED_FILE,
    check_simulated_opt_in,
    split_program,
)
from shieldtune.report import plot_metrics
from shieldtune.split.service import SIMULATED_TEE
from shieldtune.training.loop import planned_steps

__all__ = [
    "run_split_federated",
    "split_schedule",
    "SplitServer",
    "open_split_server",
    "checkpoint_split_server",
    "finish_split_server",
    "round_summary",
    "step_log",
]

log = logging.getLogger("shieldtune.split")
#: Host-side audit patterns: no tensor of these names may cross either enclave in the clear.
_SECRETS = ("hidden*", "grad*", "logits", "labels", "g:*", "u:*", "*.values", "*.indices")


def run_split_federated(
    cfg: RunConfig,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    *,
    tap: Callable[[Message], None] | None = None,
) -> Path:
    """Federated split fine-tuning of ``split.clients`` clients; writes a run folder.

    Args:
        cfg: The run config (mode ``split`` or ``plain-split``).
        on_progress: Receives one record per completed round.
        tap: Sees every Flower message on the simulated wire (tests).

    Returns:
        The completed run folder.

    Raises:
        ConfigError: ``split`` on a simulated enclave without ``split.allow_simulated``.
    """
    # setup
    s, f, t = cfg.split, cfg.federated, cfg.train
    prep = prepare(cfg)
    labels = prep.train["labels"].tolist() if cfg.model.task == "seq-cls" else None
    shares, steps, program = split_schedule(
        cfg, prep.num_labels, labels, len(prep.train["labels"]), len(prep.test["labels"])
    )
    server = open_split_server(cfg, program, on_progress)
    try:
        side, stack = server.side, server.stack

        def build(settings: LocalTraining, train: dict, test: dict, part: int) -> SplitTrainer:
            split = SplitSettings(s.cut, s.front_adapter, t.front_lr or t.lr, steps[part])
            trainer = SplitTrainer(
                settings, split, train, test, part, side.connect, step_log(server.run)
            )
            stack.callback(trainer.close)
            return trainer

        client_app = build_client_app(node_trainer_factory(cfg, prep, build), side.mods)
        server_app = build_server_app(server.strategy, f.rounds, f.round_timeout_s)
        # train
        flwr_log = logging.getLogger("flwr")
        level = flwr_log.level
        flwr_log.setLevel(logging.WARNING)
        t0 = time.perf_counter()
        try:
            grid = run_simulation(server_app, client_app, s.clients, workers=f.workers, tap=tap)
        finally:
            flwr_log.setLevel(level)
        train_time = time.perf_counter() - t0
        # save: the global front delta (client 0 holds it after the last evaluation), the server
        trainers: dict[int, SplitTrainer] = dict(client_app.trainers)  # type: ignore[attr-defined]
        first = trainers[min(trainers)]
        if first.front_adapter is not None:
            first.front_adapter.save(server.run.path / "front_adapter", base_model=cfg.model.name)
        summary = _summary(cfg, prep, shares, trainers, grid, server, train_time)
        checkpoint_split_server(server, summary)
        # cleanup: sessions end; nothing secret crossed either enclave boundary in the clear
        for trainer in trainers.values():
            trainer.close()
        final = finish_split_server(server, summary)
    except BaseException:
        server.run.abort()
        raise
    finally:
        server.stack.close()  # sessions, then the enclaves / the in-process server
    if cfg.mode == "split":
        log.warning("split run %s used %s enclaves", final.name, SIMULATED_TEE)
    return final


# ---------------------------------------------------------------------- the server side
def split_schedule(
    cfg: RunConfig, num_labels: int, labels: list[int] | None, n_train: int, n_test: int
) -> tuple[list[tuple[list[int], list[int]]], list[int], dict[str, Any]]:
    """Each client's share, its planned steps, and the measured ``split-server`` config.

    Every party computes these alike from the config and the dataset's labels and row counts
    (the server of a deployment without tokenising anything).

    Returns:
        ``(shares, steps per client over all rounds, program config)``.
    """
    s, f, t = cfg.split, cfg.federated, cfg.train
    shares = client_shares(
        labels, n_train, n_test, s.clients, f.partition, f.alpha, f.partition_seed
    )
    steps = [
        f.rounds * planned_steps(len(rows), f.local_epochs, t.batch_size, None)
        for rows, _ in shares
    ]
    total = sum(steps) if s.server_adapter == "shared" else max(steps)
    return shares, steps, split_program(cfg, num_labels, total, s.server_adapter)


@dataclass
class SplitServer:
    """The server side of a federated split run: run folder, side, strategy, what it logged.

    Attributes:
        run: The run folder.
        side: Where the split server runs and who aggregates (:class:`_Side`).
        strategy: The round strategy (aggregation, then the per_client average).
        history: Evaluation records, one per round.
        events: Other strategy events.
        stack: Closes the sessions, then the enclaves (or the in-process server).
    """

    run: Any
    side: _Side
    strategy: Any
    history: list[dict[str, Any]]
    events: list[dict[str, Any]]
    stack: ExitStack


def open_split_server(
    cfg: RunConfig,
    program: dict[str, Any],
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    relay: dict[str, Any] | None = None,
) -> SplitServer:
    """Start the server side: run folder, the split server (enclave + relay in ``split``) and
    the aggregation, wrapped so that per_client adapters are averaged after every round.

    Args:
        cfg: The run config.
        program: The ``split-server`` config (:func:`split_schedule`).
        on_progress: Receives one record per completed round.
        relay: ``host`` / ``port`` / ``tls`` of the split relay (default: loopback, a free
            port, no TLS).

    Raises:
        ConfigError: ``split`` on a simulated enclave without ``split.allow_simulated``.
    """
    s, f = cfg.split, cfg.federated
    if cfg.mode == "split":
        check_simulated_opt_in(cfg)
    run = open_run(cfg)
    history: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    plain = SparseFedAvg(
        f.min_clients,
        f.fraction,
        int(f.max_update_mb * 2**20),
        on_event=round_logger(run, cfg, on_progress, history, events),
        dp_clip=s.dp_clip,
        dp_sigma=s.dp_sigma,
    )
    stack = ExitStack()
    try:
        if cfg.mode == "split":
            side = _secure_side(cfg, program, plain, stack, **(relay or {}))
        else:
            side = _plain_side(cfg, program, plain, stack)
    except BaseException:
        stack.close()
        run.abort()
        raise
    per_client = s.server_adapter == "per_client"

    def average(server_round: int) -> dict[str, Any] | None:
        """per_client: the sessions' server adapters := their example-weighted mean."""
        return dict(side.host("average").meta) if per_client else None

    strategy = AfterTrain(side.strategy, average, plain.emit)
    return SplitServer(run, side, strategy, history, events, stack)


def checkpoint_split_server(server: SplitServer, summary: dict[str, Any]) -> None:
    """Checkpoint the split server (a host call), store its adapter (sealed in split) and the
    curves; add the server's entries to ``summary``."""
    summary["server_steps"] = int(server.side.host("checkpoint").meta["steps"])
    summary.update(server.side.save(server.run.path))
    cfg_line = f"{summary['mode']} ×{summary['clients']} ({summary['server_adapter']})"
    plot_metrics(
        server.run.path / "metrics.jsonl",
        server.run.path / "curves.png",
        title=f"{cfg_line} cut={summary['cut']} · {summary['model']}",
    )


def finish_split_server(server: SplitServer, summary: dict[str, Any]) -> Path:
    """Check that nothing secret crossed either enclave boundary in the clear, write the audit
    logs and the summary, and seal again where the finished folder is (rollback counter)."""
    for audit_file, audit in server.side.audits.items():
        for pattern in _SECRETS:
            audit.assert_nothing_clear(pattern)
        server.run.write_text(audit_file, "".join(c.to_json() + "\n" for c in audit.records))
    final = server.run.finish(summary)
    server.side.reseal(final)
    return final


# ---------------------------------------------------------------------- the two sides
@dataclass
class _Side:
    """What differs between split and plain-split: where the server runs, who aggregates.

    Attributes:
        strategy: The aggregation (plain, or the enclave wrapper around it).
        mods: Flower client mods (the sealing mod in split).
        connect: Opens one client's session with the split server.
        host: The host's calls into the split server (``average``, ``checkpoint``).
        save: Stores the server adapter in a run folder (sealed in split); returns summary
            entries.
        audits: Audit log file name -> the enclave boundary's audit log (split).
        reseal: Seals the server state again into the finished run folder (split).
    """

    strategy: Any
    mods: list[Any]
    connect: Callable[[], Link]
    host: Callable[[str], Any]
    save: Callable[[Path], dict[str, Any]]
    audits: dict[str, Any] = field(default_factory=dict)
    reseal: Callable[[Path], Any] = lambda path: None


def _plain_side(
    cfg: RunConfig, program: dict[str, Any], plain: SparseFedAvg, stack: ExitStack
) -> _Side:
    from shieldtune.split.local import LocalSplitServer

    server = stack.enter_context(LocalSplitServer(program))

    def connect() -> Link:
        remote, close = server.connect(str(program["wire_dtype"]))
        return Link(remote, close)

    def save(path: Path) -> dict[str, Any]:
        server.save_adapter(path / "back_adapter", base_model=str(program["model"]))
        return {}

    return _Side(plain, [], connect, lambda name: server.call(name), save)


def _secure_side(
    cfg: RunConfig,
    program: dict[str, Any],
    plain: SparseFedAvg,
    stack: ExitStack,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: tuple[bytes, bytes] | None = None,
) -> _Side:
    from shieldtune.federated.mods import SealedUpdateMod
    from shieldtune.federated.secure import EnclaveAggregation
    from shieldtune.split.service import SplitService, connect, split_policy
    from shieldtune.tee.attestation import Verifier
    from shieldtune.tee.audit import AuditLog
    from shieldtune.tee.enclave import create_enclave
    from shieldtune.transport.grpc_server import RelayLimits

    s, f = cfg.split, cfg.federated
    split_audit, fed_audit = AuditLog(), AuditLog()
    limits = RelayLimits(max_sessions=max(16, s.clients + 4), idle_timeout_s=3 * f.round_timeout_s)
    service = SplitService(
        program, backend=BACKEND, host=host, port=port, audit=split_audit, limits=limits, tls=tls
    )
    aggregator = create_enclave(
        BACKEND,
        enclave_program(cfg),
        enclave_config(cfg),
        audit=fed_audit,
        memory_budget_mb=f.enclave_memory_mb,
    )
    stack.callback(aggregator.stop)
    stack.callback(service.stop)

    def start_aggregation() -> EnclaveAggregation:  # (its status call loads the SPF code)
        return EnclaveAggregation(plain, aggregator.start(), handshake_timeout_s=f.round_timeout_s)

    with passive_threads(), ThreadPoolExecutor(1) as pool:  # both enclaves come up at once
        pending = pool.submit(start_aggregation)
        service.start()
        strategy = pending.result()
    fed_tee = SIMULATED_TEE if aggregator.simulated else "hardware"
    log.warning("split run: server TEE %s, aggregation TEE %s", service.tee, fed_tee)
    keys = [k for k in [service.platform_public_key] if k]
    split_trust = split_policy(
        program, allow_simulated=s.allow_simulated, simulated_platform_keys=keys
    )
    fed_keys = [getattr(getattr(aggregator, "platform", None), "public_key_hex", None)]
    fed_trust = client_policy(cfg, [k for k in fed_keys if k])

    def link() -> Link:
        remote, transport = connect(service.address, split_trust, wire_dtype=s.wire_dtype)
        return Link(
            remote, transport.close, lambda: (transport.bytes_sent, transport.bytes_received)
        )

    def save(path: Path) -> dict[str, Any]:
        service.seal(path / SEALED_FILE)  # after the host's checkpoint call
        return {
            "tee": service.tee,
            "enclave_measurement": service.measurement,
            "aggregation_tee": fed_tee,
            "aggregation_measurement": aggregator.measurement,
            "back_adapter": f"{SEALED_FILE} (sealed to the enclave measurement)",
            "audit_crossings": len(split_audit.records) + len(fed_audit.records),
            "relay_bytes_in": service.relay.bytes_in,
            "relay_bytes_out": service.relay.bytes_out,
        }

    return _Side(
        strategy,
        [SealedUpdateMod(lambda: Verifier(fed_trust))],
        link,
        lambda name: service.enclave.call(name),
        save,
        {"enclave_audit.jsonl": split_audit, "audit.jsonl": fed_audit},
        lambda path: service.seal(path / SEALED_FILE),
    )


# ---------------------------------------------------------------------- helpers
def step_log(run: Any) -> Callable[..., None]:
    """A thread-safe ``log(**record)`` writing ``client_step`` lines into ``run``."""
    lock = threading.Lock()

    def log_step(**record: Any) -> None:
        with lock:
            run.log(kind="client_step", **record)

    return log_step


def round_summary(
    cfg: RunConfig,
    shares: list[tuple[list[int], list[int]]],
    server: SplitServer,
    train_time: float,
) -> dict[str, Any]:
    """The summary entries every federated split server writes (settings, final metrics,
    history and events)."""
    s, f = cfg.split, cfg.federated
    final = server.history[-1] if server.history else {}
    return {
        "mode": cfg.mode,
        "clients": s.clients,
        "server_adapter": s.server_adapter,
        "rounds": f.rounds,
        "local_epochs": f.local_epochs,
        "partition": f.partition if f.partition == "iid" else f"dirichlet(alpha={f.alpha})",
        "dp_clip": s.dp_clip,
        "dp_sigma": s.dp_sigma,
        "cut": s.cut,
        "wire_dtype": s.wire_dtype,
        "back_method": cfg.adapter["method"],
        "model": cfg.model.name,
        "client_train_rows": [len(rows) for rows, _ in shares],
        **{k: v for k, v in final.items() if k not in ("epoch", "step")},
        "train_time_s": round(train_time, 3),
        "round_time_s": round(train_time / max(f.rounds, 1), 3),
        "events": server.events,
        "history": server.history,
    }


def _summary(
    cfg: RunConfig,
    prep: Prepared,
    shares: list[tuple[list[int], list[int]]],
    trainers: dict[int, SplitTrainer],
    grid: Any,
    server: SplitServer,
    train_time: float,
) -> dict[str, Any]:
    s, f = cfg.split, cfg.federated
    wire = [t.link.counters() for t in trainers.values()]
    sent, received = sum(w[0] for w in wire), sum(w[1] for w in wire)
    client_steps = [trainers[k].steps for k in sorted(trainers)]
    per_round = max(s.clients * f.rounds, 1)
    flower = {
        d: sum(m.nbytes for m in grid.traffic if m.direction == d)
        for d in ("to_client", "to_server")
    }
    first = trainers[min(trainers)]
    return {
        **round_summary(cfg, shares, server, train_time),
        "front_method": first.front_adapter.method if first.front_adapter else None,
        "dataset": prep.dataset.name,
        "train_rows": int(prep.train["labels"].shape[0]),
        "test_rows": int(prep.test["labels"].shape[0]),
        "server_trainable_params": first.server_info["trainable_params"],
        "client_trainable_params": first.trainable_params,
        "client_steps": client_steps,
        "wire_bytes_sent": sent,
        "wire_bytes_received": received,
        "wire_bytes_per_step": round((sent + received) / max(sum(client_steps), 1)),
        "bytes_to_client_per_round": round(flower["to_client"] / per_round),
        "bytes_to_server_per_round": round(flower["to_server"] / per_round),
    }
