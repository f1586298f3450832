"""Recipe ``split``: split fine-tuning with the server's back slice inside a TEE (Method 2).

setup -> train -> save -> cleanup, on one machine: this process starts the host service (the
``split-server`` enclave + the gRPC relay on loopback) and runs the client against it over
real gRPC. The two halves are functions of their own (:func:`train_split_client`, and
:func:`server_entries` / :func:`finish_server_run` after the server's checkpoint), so that
``shieldtune serve`` / ``join`` run the same halves on two machines
(:mod:`~shieldtune.recipes.split_deploy`). The client keeps the front slice (and its SPF
delta); the enclave keeps the back slice, its adapter and its optimiser, and the host sees only
ciphertext. The run folder has the plain-split layout, except that the server adapter is never
written in the clear: it is stored as the enclave's *sealed* state (``back_adapter.sealed``),
readable only by the same enclave build.

With ``split.clients > 1`` many clients train against the enclave at once, federated over
Flower (:mod:`~shieldtune.recipes.split_federated`, shared with plain-split).

On machines without TEE hardware the enclave is a SIMULATION (no hardware protection); the run
refuses to start unless ``split.allow_simulated: true`` and labels itself simulated in its
logs and summary.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from shieldtune.config import RunConfig
from shieldtune.errors import ConfigError
from shieldtune.models import slice_model
from shieldtune.recipes._common import Prepared, answer_evaluation, open_run, prepare
from shieldtune.report import plot_metrics
from shieldtune.split.client import SplitClient, SplitRemote, attach_front_adapter
from shieldtune.split.service import (
    SIMULATED_TEE,
    SplitService,
    connect,
    program_config,
    split_policy,
)
from shieldtune.tee.audit import AuditLog
from shieldtune.training import RunDir, evaluate, fit, make_optim
from shieldtune.training.rng import CLIENT_STREAM, RngStream

__all__ = [
    "run_split_secure",
    "check_simulated_opt_in",
    "split_program",
    "train_split_client",
    "server_entries",
    "finish_server_run",
    "SEALED_FILE",
    "BACKEND",
]

log = logging.getLogger("shieldtune.split")
SEALED_FILE = "back_adapter.sealed"
BACKEND = "simulated"  # the only backend these machines have; hardware backends slot in here


def check_simulated_opt_in(cfg: RunConfig) -> None:
    """Refuse a simulated server enclave unless ``split.allow_simulated`` is set.

    Raises:
        ConfigError: The enclave would be simulated and ``split.allow_simulated`` is false.
    """
    if BACKEND == "simulated" and not cfg.split.allow_simulated:
        raise ConfigError(
            "split.allow_simulated: the server enclave on this machine is SIMULATED (no "
            "hardware protection) and split.allow_simulated is false; set it to true for "
            "development and testing only"
        )


def split_program(
    cfg: RunConfig, num_labels: int | None, total_steps: int, server_adapter: str = "shared"
) -> dict[str, Any]:
    """The measured ``split-server`` config of a run (what every party computes alike).

    Args:
        cfg: The run config.
        num_labels: Classes of the dataset (ignored unless the task is ``seq-cls``).
        total_steps: Server steps of the run (its learning-rate schedule).
        server_adapter: ``shared`` or ``per_client``.
    """
    t, task = cfg.train, cfg.model.task
    return program_config(
        model=cfg.model.name,
        task=task,
        num_labels=num_labels if task == "seq-cls" else None,
        cut=cfg.split.cut,
        adapter=cfg.adapter,
        lr=t.lr,
        train=t,
        seed=t.seed,
        total_steps=total_steps,
        wire_dtype=cfg.split.wire_dtype,
        server_adapter=server_adapter,
    )


def run_split_secure(
    cfg: RunConfig, on_progress: Callable[[dict[str, Any]], None] | None = None
) -> Path:
    """Split fine-tuning against a server enclave over loopback gRPC; writes a run folder.

    Returns:
        The completed run folder.

    Raises:
        ConfigError: The enclave would be simulated and ``split.allow_simulated`` is false.
        AttestationError: The server enclave failed verification.
    """
    if cfg.split.clients > 1:
        from shieldtune.recipes.split_federated import run_split_federated

        return run_split_federated(cfg, on_progress)
    check_simulated_opt_in(cfg)
    # setup: client side (the whole model is loaded, only the front slice is used)
    prep = prepare(cfg)
    program = split_program(cfg, prep.num_labels, prep.total_steps)
    run = open_run(cfg)
    audit = AuditLog()  # the host's view of the enclave boundary
    service = SplitService(program, backend=BACKEND, audit=audit)
    transport = None
    try:
        service.start()
        log.warning("split run: server TEE is %s", service.tee)
        policy = split_policy(
            program,
            allow_simulated=cfg.split.allow_simulated,
            simulated_platform_keys=[k for k in [service.platform_public_key] if k],
        )
        remote, transport = connect(service.address, policy, wire_dtype=cfg.split.wire_dtype)
        # train, save (client half): the front delta in the clear (the client's own)
        client = train_split_client(cfg, prep, run, remote, transport, on_progress)
        # save (server half): the server state sealed
        service.seal(run.path / SEALED_FILE)
        summary = {**client, **server_entries(service, audit)}
        plot_metrics(
            run.path / "metrics.jsonl",
            run.path / "curves.png",
            title=f"split (TEE: {service.tee}) cut={cfg.split.cut} · {cfg.model.name} · "
            f"{prep.dataset.name}",
        )
        # cleanup
        final = finish_server_run(run, service, audit, summary)
    except BaseException:
        run.abort()
        raise
    finally:
        if transport is not None:
            transport.close()
        service.stop()
    if service.simulated:
        log.warning("split run %s used a %s enclave", final.name, SIMULATED_TEE)
    return final


def train_split_client(
    cfg: RunConfig,
    prep: Prepared,
    run: RunDir,
    remote: SplitRemote,
    transport: Any,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The client's half of a split run, against a server it verified already.

    Joins the server (``init``), attaches the front adapter (SPF warm-up through the server),
    trains for the run's budget, evaluates through the same path, commits the last server step
    and asks the enclave to checkpoint; saves the front adapter in ``run``.

    Args:
        cfg: The run config.
        prep: The client's data and model (:func:`prepare`).
        run: The client's run folder (metrics lines, ``front_adapter``).
        remote: The server stub of a verified session.
        transport: Its transport (``bytes_sent`` / ``bytes_received``).
        on_progress: Receives the training loop's progress records.

    Returns:
        The client's summary entries (wire bytes, steps, final metrics, history).
    """
    t, task = cfg.train, cfg.model.task
    front, _ = slice_model(prep.loaded.model, cfg.split.cut)
    for p in front.parameters():
        p.requires_grad_(False)
    server_info = remote.init()
    front_adapter = None
    if cfg.split.front_adapter is not None:
        front_adapter = attach_front_adapter(
            front,
            prep.loaded.model,
            cfg.split.front_adapter,
            remote,
            prep.train,
            batch_size=t.batch_size,
            seed=t.seed,
        )
    client_opt = None
    if front_adapter is not None:
        params = front_adapter.trainable_parameters()
        client_opt = make_optim(params, t.front_lr or t.lr, t, prep.total_steps)
    client = SplitClient(
        front,
        remote,
        task=task,
        precision=t.precision,
        rng=RngStream(t.seed + CLIENT_STREAM),
        optim=client_opt,
    )

    def evaluate_now() -> dict[str, float]:
        def forward_ids(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return client.logits({"input_ids": ids, "attention_mask": mask})

        metrics = evaluate(client.logits, prep.test, task, t.eval_batch_size, prep.num_labels)
        return {**metrics, **answer_evaluation(cfg, prep, forward_ids)}

    sent0, received0 = transport.bytes_sent, transport.bytes_received
    result = fit(
        client.train_step,
        evaluate_now,
        prep.train,
        epochs=t.epochs,
        batch_size=t.batch_size,
        seed=t.seed,
        max_steps=t.max_steps,
        log_every=t.log_every,
        run=run,
        on_progress=on_progress,
    )
    wire = (transport.bytes_sent - sent0, transport.bytes_received - received0)
    server_steps = client.finish()
    remote.checkpoint()
    if front_adapter is not None:
        front_adapter.save(run.path / "front_adapter", base_model=cfg.model.name)
    return {
        "mode": "split",
        "tee": SIMULATED_TEE if server_info.get("simulated") else "hardware",
        "enclave_measurement": str(server_info.get("measurement")),
        "cut": cfg.split.cut,
        "wire_dtype": cfg.split.wire_dtype,
        "back_method": cfg.adapter["method"],
        "front_method": front_adapter.method if front_adapter else None,
        "model": cfg.model.name,
        "dataset": prep.dataset.name,
        "server_trainable_params": server_info["trainable_params"],
        "client_trainable_params": client_opt.num_params() if client_opt else 0,
        "server_steps": server_steps,
        "wire_bytes_sent": wire[0],
        "wire_bytes_received": wire[1],
        "wire_bytes_per_step": round(sum(wire) / max(result["steps"], 1)),
        **result,
    }


def server_entries(service: SplitService, audit: AuditLog) -> dict[str, Any]:
    """The server's summary entries, once its state is sealed; checks the enclave boundary.

    Raises:
        AssertionError: A hidden state or gradient crossed the boundary in the clear.
    """
    audit.assert_nothing_clear("hidden*")
    audit.assert_nothing_clear("grad*")
    return {
        "tee": service.tee,
        "enclave_measurement": service.measurement,
        "back_adapter": f"{SEALED_FILE} (sealed to the enclave measurement)",
    }


def finish_server_run(
    run: RunDir, service: SplitService, audit: AuditLog, summary: dict[str, Any]
) -> Path:
    """Write the audit log and the summary, give the folder its final name, seal there again.

    The sealed file is bound to its path's rollback counter, so the state is sealed again
    where the finished run folder puts it.

    Returns:
        The finished run folder.
    """
    run.write_text("enclave_audit.jsonl", "".join(c.to_json() + "\n" for c in audit.records))
    final = run.finish(summary)
    service.seal(final / SEALED_FILE)
    return final
