"""Recipes ``plain-fedavg`` and ``secure-fedavg``: federated fine-tuning on Flower.

setup -> train -> save -> cleanup. N clients (Flower ClientApp nodes) each fine-tune the adapter
on their share of the training split for ``federated.local_epochs`` per round; the server
averages the updates weighted by sample counts; every round the clients evaluate the new global
adapter on their share of the held-out test split: loss and accuracy are the sample-weighted means,
macro-F1 is scored on the sum of the shares' confusion matrices (one ``eval`` line per round in
``metrics.jsonl``; ``macro_f1_client_mean`` keeps the weighted mean of the clients' macro-F1).

secure-fedavg is the same code with two wrappers added: the clients' ``SealedUpdateMod`` and the
server's ``EnclaveAggregation`` around the same strategy. The global adapter then exists only
inside the server enclave and the clients; the run folder holds the enclave's sealed state
(sealed after every round), the boundary audit log, and the adapter as client 0 received it.

Two ways to run the same server and client code:

- :func:`run_federated`: everything in this process on an in-process grid (``shieldtune
  train``; the simulation);
- :func:`serve_federation` (the deployment's ``ServerApp``) and :func:`node_trainer_factory` /
  :func:`node_client_mods` (the deployment's ``ClientApp`` on each SuperNode), started by
  ``shieldtune serve`` / ``shieldtune join`` (see :mod:`shieldtune.cli.flower_app`).

A secure-fedavg server stopped between rounds resumes with ``resume=RUN_DIR``: the enclave
unseals ``server_state.sealed`` (rollback-checked) and the federation goes on at the next round
with the same global adapter, in the same run folder.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from shieldtune.config import RunConfig, adapter_settings, load_config
from shieldtune.errors import ConfigError, SealingError
from shieldtune.federated.client_app import (
    AdapterTrainer,
    LocalTraining,
    Trainer,
    build_client_app,
)
from shieldtune.federated.deploy import (
    ENCLAVE_PROGRAM,
    SECURE_MODES,
    check_fingerprint,
    check_secure_opt_in,
    client_policy,
    enclave_config,
    federation_fingerprint,
)
from shieldtune.federated.partition import client_shares, take
from shieldtune.federated.server_app import build_server_app, start_rounds
from shieldtune.federated.simulation import run_simulation
from shieldtune.federated.strategy import ResumedRounds, ValidatedFedAvg
from shieldtune.recipes._common import Prepared, open_run, prepare
from shieldtune.report import plot_metrics
from shieldtune.training import RunDir

__all__ = [
    "run_federated",
    "serve_federation",
    "node_trainer_factory",
    "node_client_mods",
    "client_policy",
    "enclave_config",
    "federation_fingerprint",
    "check_fingerprint",
    "check_secure_opt_in",
    "ENCLAVE_PROGRAM",
    "SEALED_STATE",
    "round_logger",
]

SEALED_STATE = "server_state.sealed"
_SECRET_NAMES = ("g:*", "u:*", "*lora_*", "*prefix*", "*.values", "*classifier*", "*score*")
#: Fields a resumed run may change (everything else must equal the interrupted run's config).
_RESUMABLE = {
    ("federated", "rounds"),
    ("federated", "round_timeout_s"),
    ("federated", "workers"),
    ("output_dir",),
    ("run_name",),
}
_PARTIAL = ".partial-"


# ---------------------------------------------------------------------- shared pieces
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
        eval_confusion=cfg.federated.eval_confusion,
    )


# ---------------------------------------------------------------------- client side
def node_trainer_factory(
    cfg: RunConfig,
    prep: Prepared | None = None,
    build: Callable[[LocalTraining, dict, dict, int], Trainer] | None = None,
) -> Callable[[Context], Trainer]:
    """``trainer_for(context)``: the trainer of the node with ``partition-id`` of
    ``num-partitions`` in its node config (data prepared on first use unless ``prep``), built
    once per node by ``build(settings, train_share, test_share, partition)`` (default:
    :class:`AdapterTrainer`)."""
    settings_and_prep: dict[str, Any] = {}
    shares: dict[int, list[tuple[list[int], list[int]]]] = {}
    built: dict[int, Trainer] = {}
    make = build or AdapterTrainer
    lock = threading.Lock()

    def trainer_for(context: Context) -> Trainer:
        with lock:
            if context.node_id not in built:
                built[context.node_id] = _build(context)
            return built[context.node_id]

    def _build(context: Context) -> Trainer:
        if "prep" not in settings_and_prep:
            p = prep if prep is not None else prepare(cfg)
            settings_and_prep.update(prep=p, settings=_settings(cfg, p.num_labels))
        p, settings = settings_and_prep["prep"], settings_and_prep["settings"]
        try:
            part = int(context.node_config["partition-id"])
            parts = int(context.node_config["num-partitions"])
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"node config needs integer partition-id and num-partitions ({err!r})"
            ) from None
        if not 0 <= part < parts:
            raise ConfigError(f"partition-id {part} is outside 0..{parts - 1}")
        if parts not in shares:
            labels = p.train["labels"].tolist() if cfg.model.task == "seq-cls" else None
            n_train, n_test = int(p.train["labels"].shape[0]), int(p.test["labels"].shape[0])
            f = cfg.federated
            shares[parts] = client_shares(
                labels, n_train, n_test, parts, f.partition, f.alpha, f.partition_seed
            )
        train_rows, test_rows = shares[parts][part]
        return make(settings, take(p.train, train_rows), take(p.test, test_rows), part)

    return trainer_for


def node_client_mods(cfg: RunConfig, policy: Any) -> list[Any]:
    """The client mods of ``cfg.mode``: none (plain) or the sealed-update mod checking the
    server enclave against ``policy`` (secure)."""
    if cfg.mode != "secure-fedavg":
        return []
    from shieldtune.federated.mods import SealedUpdateMod
    from shieldtune.tee.attestation import Verifier

    return [SealedUpdateMod(lambda: Verifier(policy))]


# ---------------------------------------------------------------------- server side
@dataclass
class _Server:
    """The server side of one run: run folder, strategy, enclave and what was logged."""

    run: RunDir
    strategy: Strategy
    history: list[dict[str, Any]]
    events: list[dict[str, Any]]
    done: int = 0  # rounds completed before this start (resume)
    enclave: Any = None
    audit: Any = None
    secure: Any = None  # the EnclaveAggregation wrapper
    stopped: bool = False


def round_logger(
    run: RunDir,
    cfg: RunConfig,
    on_progress: Callable[[dict[str, Any]], None] | None,
    history: list[dict[str, Any]],
    events: list[dict[str, Any]],
    done: int = 0,
):
    """Turn strategy events into metrics lines, history and progress updates (``eval`` lines,
    one ``train`` line per aggregated round, every other event as it is)."""
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
                rate = (rnd - done) / max(time.perf_counter() - started, 1e-9)
                on_progress({"step": rnd, "total": rounds, "loss": loss, "samples_per_s": rate})
        else:
            events.append(event)
            run.log(**event)

    return on_event


def _run_folders(resume: Path) -> tuple[Path, str, Path, Path]:
    """``(parent, name, final, partial)`` of a run folder given as either name."""
    resume = Path(resume).resolve()
    parent, name = resume.parent, resume.name
    if name.startswith(_PARTIAL):
        name = name[len(_PARTIAL) :]
    return parent, name, parent / name, parent / f"{_PARTIAL}{name}"


def _config_differences(cfg: RunConfig, old: RunConfig) -> list[str]:
    def flat(d: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
        out: dict[tuple[str, ...], Any] = {}
        for k, v in d.items():
            if isinstance(v, dict) and prefix + (k,) != ("adapter",):
                out.update(flat(v, prefix + (k,)))
            else:
                out[prefix + (k,)] = v
        return out

    a, b = flat(cfg.model_dump(mode="json")), flat(old.model_dump(mode="json"))
    keys = sorted((set(a) | set(b)) - _RESUMABLE)
    return [
        f"{'.'.join(k)}: {b.get(k)!r} in the interrupted run, {a.get(k)!r} now"
        for k in keys
        if a.get(k) != b.get(k)
    ]


def _read_metrics(path: Path, done: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Eval history and other events of rounds <= ``done`` from an earlier ``metrics.jsonl``."""
    history: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return history, events
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        kind = rec.pop("kind", None)
        rec.pop("time_s", None)
        rnd = rec.get("round", rec.get("step", 0))
        if not isinstance(rnd, int) or rnd > done:
            continue
        if kind == "eval":
            history.append(rec)
        elif kind not in ("train", "resumed"):
            events.append({"kind": kind, **rec})
    return history, events


def _start_enclave(cfg: RunConfig, audit_path: Path | None) -> tuple[Any, Any]:
    from shieldtune.tee.audit import AuditLog
    from shieldtune.tee.enclave import create_enclave

    f = cfg.federated
    audit = AuditLog(audit_path)
    enclave = create_enclave(
        f.backend,
        ENCLAVE_PROGRAM,
        enclave_config(cfg),
        audit=audit,
        memory_budget_mb=f.enclave_memory_mb,
    )
    return enclave.start(), audit


def _resume_server(cfg: RunConfig, resume: Path) -> tuple[RunDir, Any, Any, int]:
    """Reopen an interrupted secure-fedavg run folder with its enclave state unsealed.

    Nothing in the folder is written before the sealed state was accepted: a refused file
    (tampered, another enclave build, rolled back) leaves the folder exactly as it was.

    Returns:
        ``(run folder, started enclave, its audit log, rounds already completed)``.

    Raises:
        ConfigError: Not secure-fedavg, no such run folder, another config, or nothing left to do.
        SealingError: The sealed state was refused.
    """
    if cfg.mode != "secure-fedavg":
        raise ConfigError(
            "--resume: only secure-fedavg keeps a sealed server state; plain-fedavg restarts "
            "from round 1"
        )
    parent, name, final, partial = _run_folders(resume)
    if final.is_dir() and partial.is_dir():
        raise ConfigError(f"--resume: both {final} and {partial} exist; remove the stale one")
    folder = final if final.is_dir() else partial
    if not folder.is_dir():
        raise ConfigError(f"--resume: no run folder {final} (or {partial})")
    if not (folder / "config.yaml").is_file():
        raise ConfigError(f"--resume: {folder} has no config.yaml: not a run folder")
    if not (folder / SEALED_STATE).is_file():
        raise SealingError(f"--resume: {folder} holds no {SEALED_STATE}: nothing to resume from")
    problems = _config_differences(cfg, load_config(folder / "config.yaml"))
    if problems:
        raise ConfigError([f"--resume: config differs from the run's: {p}" for p in problems])
    # The enclave sealed its state while the folder was .partial-<name> (the platform counter
    # is bound to that path): continue there, and put the name back if anything is refused.
    enclave, audit = _start_enclave(cfg, None)  # audit in memory until the folder is ours
    renamed = False
    try:
        if folder == final:
            os.replace(final, partial)
            renamed = True
        enclave.unseal(partial / SEALED_STATE)
        done = int(enclave.call("status").meta_int("round"))
        if done >= cfg.federated.rounds:
            raise ConfigError(
                f"--resume: {name} completed {done} round(s) already; set federated.rounds "
                f"above {done} to continue"
            )
        run = RunDir(parent, name, resume=True)
    except BaseException:
        enclave.stop()
        if renamed:
            os.replace(partial, final)
        raise
    # this session's crossings go on in the run's audit log
    audit.path = partial / "audit.jsonl"
    with audit.path.open("a", encoding="utf-8") as out:
        out.writelines(c.to_json() + "\n" for c in audit.records)
    return run, enclave, audit, done


def _open_server(
    cfg: RunConfig,
    on_progress: Callable[[dict[str, Any]], None] | None,
    resume: Path | None,
) -> _Server:
    """Run folder, strategy (plus enclave and wrappers for secure-fedavg), event logger."""
    from shieldtune.federated.secure import EnclaveAggregation

    f, secure = cfg.federated, cfg.mode in SECURE_MODES
    enclave = audit = None
    done = 0
    history: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    if resume is not None:
        run, enclave, audit, done = _resume_server(cfg, resume)
        history, events = _read_metrics(run.path / "metrics.jsonl", done)
        run.log(kind="resumed", round=done, rounds=f.rounds)
    else:
        run = open_run(cfg)
    try:
        on_event = round_logger(run, cfg, on_progress, history, events, done)
        plain = ValidatedFedAvg(
            f.min_clients, f.fraction, int(f.max_update_mb * 2**20), on_event=on_event
        )
        strategy: Strategy = plain
        wrapped = None
        if secure:
            if enclave is None:
                enclave, audit = _start_enclave(cfg, run.path / "audit.jsonl")
            wrapped = EnclaveAggregation(
                plain,
                enclave,
                handshake_timeout_s=f.round_timeout_s,
                seal_path=run.path / SEALED_STATE,
            )
            strategy = wrapped
        if done:
            strategy = ResumedRounds(strategy, done)
    except BaseException:
        if enclave is not None:
            enclave.stop()
        run.abort()
        raise
    return _Server(run, strategy, history, events, done, enclave, audit, wrapped)


def _finish_server(
    server: _Server, cfg: RunConfig, train_time: float, extra: dict[str, Any]
) -> Path:
    """Audit (secure), curves and summary; the run folder gets its final name."""
    f, run = cfg.federated, server.run
    if server.enclave is not None and server.audit is not None:
        _stop(server)  # its last crossings go into the run folder's audit log
        for pattern in _SECRET_NAMES:
            server.audit.assert_nothing_clear(pattern)
        extra["audit_crossings"] = len(server.audit.records)
        extra["simulated_enclave"] = server.enclave.simulated
        extra["sealed_round"] = server.secure.sealed if server.secure is not None else None
    if server.done:
        extra["resumed_after_round"] = server.done
    plot_metrics(
        run.path / "metrics.jsonl",
        run.path / "curves.png",
        title=f"{cfg.mode} {cfg.adapter['method']} · {cfg.model.name} · {f.num_clients} clients",
    )
    rounds = f.rounds - server.done
    final = server.history[-1] if server.history else {}
    return run.finish(
        {
            "mode": cfg.mode,
            "method": cfg.adapter["method"],
            "model": cfg.model.name,
            "clients": f.num_clients,
            "rounds": f.rounds,
            "partition": f.partition if f.partition == "iid" else f"dirichlet(alpha={f.alpha})",
            **extra,
            **{k: v for k, v in final.items() if k not in ("epoch", "step")},
            "steps": f.rounds,
            "train_time_s": round(train_time, 3),
            "round_time_s": round(train_time / max(rounds, 1), 3),
            "events": server.events,
            "history": server.history,
        }
    )


def _stop(server: _Server | None) -> None:
    if server is not None and server.enclave is not None and not server.stopped:
        server.stopped = True
        server.enclave.stop()


# ---------------------------------------------------------------------- simulation
def run_federated(
    cfg: RunConfig,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    *,
    resume: Path | None = None,
) -> Path:
    """Run plain-fedavg, secure-fedavg or shielded-fedavg as a Flower simulation; write a run
    folder.

    Args:
        cfg: The run config.
        on_progress: Receives one record per completed round.
        resume: An interrupted secure-fedavg run folder to continue (see module docstring).

    Returns:
        The completed run folder.
    """
    # setup
    f = cfg.federated
    check_secure_opt_in(cfg)
    prep = prepare(cfg)
    settings = _settings(cfg, prep.num_labels)
    server = _open_server(cfg, on_progress, resume)
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    parties = ExitStack()  # shielded-fedavg: every client's enclave and accelerator
    try:
        keys = getattr(server.enclave, "platform", None)
        key = getattr(keys, "public_key_hex", None)
        policy = client_policy(cfg, [key] if key else []) if server.enclave is not None else None
        if cfg.mode == "shielded-fedavg":
            trainer_for, mods = _shielded_clients(cfg, prep, policy, parties, server.run.path)
        else:
            trainer_for, mods = node_trainer_factory(cfg, prep), node_client_mods(cfg, policy)
        client_app = build_client_app(trainer_for, mods)
        server_app = build_server_app(server.strategy, f.rounds - server.done, f.round_timeout_s)
        # train
        flwr_log.setLevel(logging.WARNING)
        t0 = time.perf_counter()
        grid = run_simulation(server_app, client_app, f.num_clients, workers=f.workers)
        train_time = time.perf_counter() - t0
        # save
        trainers = client_app.trainers  # type: ignore[attr-defined]
        first = trainers[min(trainers)]
        first.save(server.run.path / "adapter")  # as client 0 holds it (sealed if shielded)
        to_client = [t.nbytes for t in grid.traffic if t.direction == "to_client"]
        to_server = [t.nbytes for t in grid.traffic if t.direction == "to_server"]
        per_round = f.num_clients * (f.rounds - server.done)
        n_train, n_test = int(prep.train["labels"].shape[0]), int(prep.test["labels"].shape[0])
        labels = prep.train["labels"].tolist() if cfg.model.task == "seq-cls" else None
        shares = client_shares(
            labels, n_train, n_test, f.num_clients, f.partition, f.alpha, f.partition_seed
        )
        extra = {
            "method": settings.method,
            "dataset": prep.dataset.name,
            "train_rows": n_train,
            "test_rows": n_test,
            "client_train_rows": [len(s[0]) for s in shares],
            "bytes_to_client_per_round": round(sum(to_client) / per_round),
            "bytes_to_server_per_round": round(sum(to_server) / per_round),
        }
        if cfg.mode == "shielded-fedavg":
            extra.update(_check_parties(trainers.values(), server.run.path))
        # cleanup
        final = _finish_server(server, cfg, train_time, extra)
        if cfg.mode == "shielded-fedavg":
            first.save(final / "adapter")  # sealed again, bound to the folder's final name
        return final
    except BaseException:
        server.run.abort()
        raise
    finally:
        flwr_log.setLevel(level)
        parties.close()
        _stop(server)


def _shielded_clients(
    cfg: RunConfig, prep: Prepared, policy: Any, parties: ExitStack, run_path: Path
) -> tuple[Callable[[Context], Trainer], list[Any]]:
    """shielded-fedavg clients: each node's party (enclave + accelerator, entered on
    ``parties``) trains in its enclave; its channel to the server enclave ends in there."""
    from shieldtune.federated.mods import PartySealedMod
    from shieldtune.recipes.shielded import (
        ACCEL_AUDIT,
        ShieldedTrainer,
        open_party,
        party_config,
        party_options,
    )

    s = cfg.shielded
    num_labels = prep.num_labels if cfg.model.task == "seq-cls" else None
    config = party_config(cfg, num_labels, prep.total_steps, policy.model_dump_json())

    def build(settings: LocalTraining, train: dict, test: dict, part: int) -> Trainer:
        audit = run_path / ACCEL_AUDIT.replace(".jsonl", f"_{part}.jsonl") if s.offload else None
        party = parties.enter_context(open_party(config, **party_options(s), accel_audit=audit))
        return ShieldedTrainer(party, settings, train, test, part, s.refill)

    trainer_for = node_trainer_factory(cfg, prep, build)
    return trainer_for, [PartySealedMod(lambda ctx: trainer_for(ctx).party)]  # type: ignore[attr-defined]


def _check_parties(trainers: Any, run_path: Path) -> dict[str, Any]:
    """Every party's boundary: no adapter tensor and no batch crossed it in the clear, and
    every operand its accelerator saw was masked. Writes each party's audit log."""
    from shieldtune.recipes.shielded import check_accelerator_view

    crossings = 0
    tees = set()
    for t in trainers:
        party, part = t.party, t.partition
        for pattern in (*_SECRET_NAMES, "input_ids", "labels"):
            party.audit.assert_nothing_clear(pattern)
        lines = "".join(c.to_json() + "\n" for c in party.audit.records)
        (run_path / f"party_audit_{part}.jsonl").write_text(lines)
        if party.accelerator is not None:
            crossings += check_accelerator_view(party.accelerator.audit)
        tees.add(party.tee)
    return {"party_tee": sorted(tees), "accelerator_crossings": crossings}


# ---------------------------------------------------------------------- deployment
def serve_federation(
    cfg: RunConfig,
    grid: Grid,
    *,
    resume: Path | None = None,
    wait_for_clients_s: float | None = None,
) -> Path:
    """The deployment's server side: run the rounds on a SuperLink's grid, write a run folder.

    The server holds no data and no model: clients train and evaluate; the run folder holds the
    metrics, the summary and (secure-fedavg) the sealed enclave state and the audit log.

    Args:
        cfg: The server's run config.
        grid: The SuperLink's grid (from Flower's ``ServerApp`` main).
        resume: An interrupted secure-fedavg run folder to continue.
        wait_for_clients_s: How long to wait for ``federated.num_clients`` nodes before round 1
            (default: ``federated.round_timeout_s``); goes on with ``min_clients`` of them.

    Returns:
        The completed run folder.
    """
    from shieldtune.federated.deploy import PollingGrid, wait_for_nodes

    f = cfg.federated
    check_secure_opt_in(cfg)
    server = _open_server(cfg, None, resume)
    try:
        wait = f.round_timeout_s if wait_for_clients_s is None else wait_for_clients_s
        polling = grid if isinstance(grid, PollingGrid) else PollingGrid(grid)
        wait_for_nodes(polling, f.num_clients, f.min_clients, wait)
        t0 = time.perf_counter()
        start_rounds(server.strategy, polling, f.rounds - server.done, f.round_timeout_s)
        train_time = time.perf_counter() - t0
        return _finish_server(server, cfg, train_time, {})
    except BaseException:
        server.run.abort()
        raise
    finally:
        _stop(server)
