"""Recipe ``split`` across machines: the server half and the client half in separate processes.

``shieldtune serve`` runs :func:`serve_split` on the server host and ``shieldtune join`` runs
:func:`join_split` on a client host; together they are the one-machine recipe
(:func:`~shieldtune.recipes.split_secure.run_split_secure`) cut in two along the gRPC relay::

    server host:  split-server enclave + relay (--host/--port, TLS)  -> run folder: sealed
                  server state, enclave audit log, summary (relayed bytes, server steps)
    client host:  verify the enclave (measurement from its own code + config; a simulated
                  one only with split.allow_simulated and its platform key pinned), train the
                  front slice (+ SPF) for its budget, evaluate  -> run folder: metrics, front
                  delta (the client's own), summary (wire bytes)

Both parties compute the enclave's measured config (:func:`server_program`) from the same run
config and the same data *description*: the server reads the dataset only to count its rows
and classes (the learning-rate schedule and the head are part of the measurement); it trains on
nothing and never sees a row. With the same config and seeds the deployed run's losses equal
``shieldtune train``'s step for step.

With ``split.clients > 1`` the rounds run on Flower's deployment runtime instead
(:mod:`~shieldtune.recipes.split_rounds`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shieldtune.config import RunConfig
from shieldtune.errors import ConfigError
from shieldtune.recipes._common import load_splits, open_run, passive_threads, prepare
from shieldtune.recipes.split_secure import (
    BACKEND,
    SEALED_FILE,
    check_simulated_opt_in,
    finish_server_run,
    server_entries,
    split_program,
    train_split_client,
)
from shieldtune.report import plot_metrics
from shieldtune.split.service import SIMULATED_TEE, SplitService, connect, split_policy
from shieldtune.tee.audit import AuditLog
from shieldtune.training.loop import planned_steps
from shieldtune.transport.grpc_server import RelayLimits

__all__ = ["server_program", "check_trust", "serve_split", "join_split"]

log = logging.getLogger("shieldtune.split")


def server_program(cfg: RunConfig) -> dict[str, Any]:
    """The measured ``split-server`` config from the run config and the dataset's row count
    and classes (no model, no tokenisation): what :func:`serve_split` starts and what
    :func:`join_split` computes from its own copy."""
    ds, train_ds, _ = load_splits(cfg)
    t = cfg.train
    return split_program(
        cfg, ds.num_labels, planned_steps(len(train_ds), t.epochs, t.batch_size, t.max_steps)
    )


def check_trust(cfg: RunConfig, platform_keys: list[str]) -> None:
    """A client accepts a SIMULATED enclave only with ``split.allow_simulated`` *and* its
    platform key pinned (the key says which machine's simulation it trusts).

    Raises:
        ConfigError: ``split.allow_simulated`` without a pinned platform key.
    """
    if cfg.split.allow_simulated and not platform_keys:
        raise ConfigError(
            "a simulated server enclave is verified by its platform key: pass "
            "--trust-platform-key KEY (shieldtune serve prints it)"
        )


def _one_client(cfg: RunConfig) -> None:
    if cfg.mode != "split":
        raise ConfigError(
            f"mode: across machines shieldtune serve/join run split (or plain-fedavg, "
            f"secure-fedavg), not {cfg.mode!r}; plain-split runs on one machine "
            "(shieldtune train)"
        )
    if cfg.split.clients > 1:
        raise ConfigError(
            f"split.clients: {cfg.split.clients} clients run in rounds on Flower "
            "(recipes.split_rounds); serve_split / join_split run one client"
        )


def serve_split(
    cfg: RunConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: tuple[bytes, bytes] | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    poll_s: float = 0.5,
) -> Path:
    """The server half of a one-client split run: serve until the client has finished.

    Starts the ``split-server`` enclave (and builds its state: a host ``init``, as the first
    client's would) and its relay on ``host:port``, and serves until a session stream was
    closed by its client (a stream that breaks off, e.g. a peer sending a garbage record, is
    reported and the server goes on waiting), or until interrupted (Ctrl-C, SIGTERM). Then it
    checkpoints the enclave (a host call: steps only), seals its state into the run folder and
    writes the audit log and the summary (``interrupted: true`` if so).

    Args:
        cfg: The run config (``mode: split``, ``split.clients: 1``).
        host: Interface of the relay.
        port: Port of the relay (0: a free one).
        tls: ``(certificate PEM, key PEM)`` of the relay; None: plaintext gRPC.
        on_event: Receives ``("listening", {...})`` (address, measurement, platform key,
            tee) once the relay is up, then ``("session", {...})`` as each stream ends.
        poll_s: How often the wait wakes up.

    Returns:
        The finished server run folder.

    Raises:
        ConfigError: Not split, or a simulated enclave without ``split.allow_simulated``.
    """
    _one_client(cfg)
    check_simulated_opt_in(cfg)
    emit = on_event or (lambda kind, info: None)
    program = server_program(cfg)
    run = open_run(cfg)
    audit = AuditLog()
    limits = RelayLimits(max_sessions=4)
    service = SplitService(
        program, backend=BACKEND, host=host, port=port, audit=audit, limits=limits, tls=tls
    )
    relay = service.relay
    try:
        with passive_threads():  # the enclave's idle threads sleep while the host relays
            service.start()
        service.enclave.call("init")  # the server state, built before any client comes
        emit(
            "listening",
            {
                "address": service.address,
                "measurement": service.measurement,
                "platform_key": service.platform_public_key,
                "tee": service.tee,
                "tls": tls is not None,
            },
        )
        t0 = time.perf_counter()
        interrupted = _wait_finished(relay, cfg.split.clients, emit, poll_s)
        serve_time = time.perf_counter() - t0
        steps = int(service.enclave.call("checkpoint").meta["steps"])  # type: ignore[arg-type]
        service.seal(run.path / SEALED_FILE)
        summary = {
            "mode": "split",
            "role": "server",
            **server_entries(service, audit),
            "model": cfg.model.name,
            "cut": cfg.split.cut,
            "back_method": cfg.adapter["method"],
            "clients": cfg.split.clients,
            "client_sessions": list(relay.outcomes),
            "interrupted": interrupted,
            "server_steps": steps,
            "planned_steps": int(program["total_steps"]),  # type: ignore[arg-type]
            "relay_address": service.address,
            "relay_tls": tls is not None,
            "relay_bytes_in": relay.bytes_in,
            "relay_bytes_out": relay.bytes_out,
            "audit_crossings": len(audit.records),
            "serve_time_s": round(serve_time, 3),
        }
        final = finish_server_run(run, service, audit, summary)
    except BaseException:
        run.abort()
        raise
    finally:
        service.stop()
    if service.simulated:
        log.warning("split server run %s used a %s enclave", final.name, SIMULATED_TEE)
    return final


def _wait_finished(
    relay: Any, clients: int, emit: Callable[[str, dict[str, Any]], None], poll_s: float
) -> bool:
    """Wait until ``clients`` session streams were closed by their clients; report each
    stream's end. Returns whether the wait was interrupted (Ctrl-C, SIGTERM)."""
    seen = 0
    try:
        while relay.outcomes.count("finished") < clients:
            relay.wait_streams(seen + 1, poll_s)
            for outcome in relay.outcomes[seen:]:
                seen += 1
                emit("session", {"outcome": outcome, "ended": seen, "bytes_in": relay.bytes_in})
    except KeyboardInterrupt:
        return True
    return False


def join_split(
    cfg: RunConfig,
    *,
    address: str,
    platform_keys: list[str],
    root_certificates: bytes | None = None,
    connect_timeout_s: float = 30.0,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """The client half of a one-client split run against a server on another host.

    Verifies the server enclave before anything leaves this process (the measurement computed
    from this host's code and config), then trains, evaluates and writes the client's run
    folder (metrics, its own front delta, summary with the wire bytes).

    Args:
        cfg: The run config (the same as the server's).
        address: ``host:port`` of the server's relay.
        platform_keys: Pinned platform keys of a simulated enclave.
        root_certificates: CA PEM of the relay's TLS certificate; None: plaintext gRPC.
        connect_timeout_s: How long to wait for the server to be reachable.
        on_progress: Receives the training loop's progress records.

    Returns:
        The finished client run folder.

    Raises:
        ConfigError: Not split, or simulated trust without a pinned key.
        AttestationError: The server enclave failed verification.
        ChannelError: The server is unreachable or ended the session.
    """
    _one_client(cfg)
    check_trust(cfg, platform_keys)
    prep = prepare(cfg)
    program = split_program(cfg, prep.num_labels, prep.total_steps)
    policy = split_policy(
        program, allow_simulated=cfg.split.allow_simulated, simulated_platform_keys=platform_keys
    )
    remote, transport = connect(
        address,
        policy,
        wire_dtype=cfg.split.wire_dtype,
        root_certificates=root_certificates,
        connect_timeout_s=connect_timeout_s,
    )
    run = None
    try:
        run = open_run(cfg)
        summary = train_split_client(cfg, prep, run, remote, transport, on_progress)
        plot_metrics(
            run.path / "metrics.jsonl",
            run.path / "curves.png",
            title=f"split client (server {address}) cut={cfg.split.cut} · {cfg.model.name}",
        )
        summary.update(role="client", server=address, tls=root_certificates is not None)
        final = run.finish(summary)
    except BaseException:
        if run is not None:
            run.abort()
        raise
    finally:
        transport.close()
    return final
