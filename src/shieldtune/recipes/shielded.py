"""Recipe ``shielded``: Method 1 for one party — the adapter in its TEE, frozen maps offloaded.

setup -> train -> save -> cleanup. This process is the party's untrusted host: it reads and
tokenises its own data, starts the accelerator worker (an untrusted OS process holding the public
base weights) and the ``shielded-party`` enclave, verifies the enclave's quote, and then talks to
it only over the attested channel. The enclave trains; the worker sees one-time-padded operands
only; the run folder gets the adapter *sealed* to the enclave measurement, both boundary audit
logs, and the offload's time split.

On machines without TEE hardware the enclave is a SIMULATION (no hardware protection); the run
refuses to start unless ``shielded.allow_simulated: true`` and says so in its logs and summary.
With ``shielded.offload: false`` the same program is the TEE-only baseline.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shieldtune.config import RunConfig
from shieldtune.crypto.framing import MetaValue
from shieldtune.errors import ConfigError, IntegrityError
from shieldtune.recipes._common import answer_evaluation, open_run, passive_threads, prepare
from shieldtune.report import plot_metrics
from shieldtune.shielded.program import PROGRAM_NAME
from shieldtune.shielded.worker import AcceleratorProcess
from shieldtune.tee.attestation import Policy, Verifier
from shieldtune.tee.audit import AuditLog
from shieldtune.tee.client import SecureClient, connect_local
from shieldtune.tee.enclave import Enclave, create_enclave
from shieldtune.tee.program import measure_program
from shieldtune.training import evaluate, fit
from shieldtune.training.steps import optim_settings

__all__ = [
    "run_shielded",
    "party_config",
    "ShieldedSession",
    "ShieldedTrainer",
    "open_party",
    "party_options",
    "SEALED_FILE",
]

log = logging.getLogger("shieldtune.shielded")
SEALED_FILE = "adapter.sealed"
SIMULATED_TEE = "simulated (no hardware protection)"
ACCEL_AUDIT = "accelerator_audit.jsonl"


def party_config(
    cfg: RunConfig, num_labels: int | None, total_steps: int, server_policy: str = ""
) -> dict[str, MetaValue]:
    """The ``shielded-party`` config (measured: a verifier accepts exactly these settings).

    ``server_policy``: JSON of the policy the party checks the server's ``fedavg`` enclave
    against (``shielded-fedavg``); empty for a party that trains alone.
    """
    t, s = cfg.train, cfg.shielded
    max_len = cfg.data.max_length
    return {
        "model": cfg.model.name,
        "task": cfg.model.task,
        "num_labels": num_labels,
        "adapter": json.dumps(dict(cfg.adapter), sort_keys=True),
        "lr": float(t.lr),
        **optim_settings(t),
        "seed": int(t.seed),
        "total_steps": int(total_steps),
        "offload": bool(s.offload),
        "w_bits": int(s.w_bits),
        "field_bits": int(s.field_bits),
        "max_bits": int(s.max_bits),
        "check_rate": float(s.check_rate),
        "fused": bool(s.fused),
        "pool_size": int(s.pool_size),
        "rows": int(t.batch_size * max_len),
        "allow_export": False,
        "server_policy": server_policy,
    }


def party_options(s: Any) -> dict[str, Any]:
    """``open_party`` keyword arguments from a run config's ``shielded`` section."""
    return {
        "backend": s.backend,
        "allow_simulated": s.allow_simulated,
        "device": s.device,
        "gemm": s.gemm,
        "memory_mb": s.enclave_memory_mb,
    }


@dataclass
class ShieldedSession:
    """A running party: its enclave (verified channel), accelerator and audit logs."""

    enclave: Enclave
    client: SecureClient
    accelerator: AcceleratorProcess | None
    audit: AuditLog
    info: dict[str, Any]
    tee: str

    def call(self, ecall: str, meta: dict[str, MetaValue] | None = None, tensors=None):  # noqa: ANN001, ANN201
        """An ECALL over the attested channel."""
        return self.client.call(ecall, meta, tensors)


@contextmanager
def open_party(
    config: dict[str, MetaValue],
    *,
    backend: str = "simulated",
    allow_simulated: bool = False,
    device: str = "auto",
    gemm: str = "auto",
    memory_mb: float = 4096.0,
    accel_audit: Path | None = None,
    capture: Path | None = None,
    capture_limit: int = 0,
) -> Iterator[ShieldedSession]:
    """Start the worker (if offloading) and the enclave, verify it, init and attach; stop both.

    Raises:
        ConfigError: The enclave would be simulated and ``allow_simulated`` is false.
        AttestationError: The enclave failed verification.
    """
    audit = AuditLog()  # the host's view of the enclave boundary
    enclave = create_enclave(backend, PROGRAM_NAME, config, audit=audit, memory_budget_mb=memory_mb)
    if enclave.simulated and not allow_simulated:
        raise ConfigError(
            "shielded.allow_simulated: the party's enclave on this machine is SIMULATED (no "
            "hardware protection) and shielded.allow_simulated is false; set it to true for "
            "development and testing only"
        )
    accel = None
    if config["offload"]:
        accel = AcceleratorProcess(audit=accel_audit, capture=capture, capture_limit=capture_limit)
    try:
        if accel is not None:
            accel.start()
        with passive_threads(accel is not None):
            enclave.start()
        platform_key = getattr(getattr(enclave, "platform", None), "public_key_hex", None)
        policy = Policy(
            allowed_measurements=[measure_program(PROGRAM_NAME, config)],
            allow_simulated=allow_simulated,
            simulated_platform_keys=[platform_key] if platform_key else [],
        )
        client, _ = connect_local(enclave, Verifier(policy))
        info = dict(client.call("init").meta)
        if accel is not None:
            meta = {"socket": accel.socket_path, "device": device, "backend": gemm}
            info.update(client.call("attach", meta).meta)
        tee = SIMULATED_TEE if enclave.simulated else backend
        if enclave.simulated:
            log.warning("shielded party: enclave is %s", SIMULATED_TEE)
        yield ShieldedSession(enclave, client, accel, audit, info, tee)
    finally:
        enclave.stop()
        if accel is not None:
            accel.stop()


def _forward_tensors(
    batch: dict[str, torch.Tensor], labels: bool = False
) -> dict[str, torch.Tensor]:
    """What the enclave needs of a batch (not, e.g., the host's own answer-scoring fields)."""
    keys = ("input_ids", "attention_mask", "token_type_ids", *(("labels",) if labels else ()))
    return {k: batch[k] for k in keys if batch.get(k) is not None}


def check_accelerator_view(path: Path) -> int:
    """Raise unless every operand the accelerator logged was masked; return how many.

    Raises:
        IntegrityError: A crossing was not masked, or nothing was logged at all.
    """
    records = AuditLog.read_jsonl(path)
    clear = [r for r in records if r.protection != "masked"]
    if clear or not records:
        raise IntegrityError(
            f"accelerator audit: {len(clear)} of {len(records)} crossings were not masked"
        )
    return len(records)


def run_shielded(
    cfg: RunConfig, on_progress: Callable[[dict[str, Any]], None] | None = None
) -> Path:
    """Train one party's adapter with Method 1 and write a run folder.

    Returns:
        The completed run folder.

    Raises:
        ConfigError: Simulated enclave without opt-in, or a precision other than float32.
        IntegrityError: The accelerator returned a wrong product (Freivalds) or saw a clear
            operand.
    """
    if cfg.train.precision != "float32":
        raise ConfigError(
            f"train.precision: shielded mode computes in exact fixed point and float32; "
            f"got {cfg.train.precision!r}"
        )
    # setup: the host's own data, tokenised here
    prep = prepare(cfg)
    t, s, task = cfg.train, cfg.shielded, cfg.model.task
    config = party_config(cfg, prep.num_labels if task == "seq-cls" else None, prep.total_steps)
    run = open_run(cfg)
    accel_audit = run.path / ACCEL_AUDIT if s.offload else None
    capture = run.path / "accelerator_view" if s.capture else None
    try:
        with open_party(
            config,
            **party_options(s),
            accel_audit=accel_audit,
            capture=capture,
            capture_limit=s.capture,
        ) as party:

            def step(batch: dict[str, torch.Tensor]) -> float:
                reply = party.call("train_step", tensors=_forward_tensors(batch, labels=True))
                if s.offload and s.refill == "after-step":
                    party.call("refill")  # offline work, timed by the enclave apart
                return float(reply.meta["loss"])  # type: ignore[arg-type]

            def logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
                return party.call("logits", tensors=_forward_tensors(batch)).tensors["logits"]

            def evaluate_now() -> dict[str, float]:
                def forward_ids(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                    return logits({"input_ids": ids, "attention_mask": mask})

                metrics = evaluate(logits, prep.test, task, t.eval_batch_size, prep.num_labels)
                if s.offload and s.refill == "idle":
                    party.call("refill")
                return {**metrics, **answer_evaluation(cfg, prep, forward_ids)}

            # train
            result = fit(
                step,
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
            # save: the adapter sealed to the enclave, the figures in the clear
            stats = dict(party.call("stats").meta)
            party.call("checkpoint")
            party.enclave.seal(run.path / SEALED_FILE)
            party.audit.assert_nothing_clear("input_ids")
            party.audit.assert_nothing_clear("labels")
            crossings = check_accelerator_view(accel_audit) if accel_audit else 0
            run.write_text(
                "enclave_audit.jsonl", "".join(c.to_json() + "\n" for c in party.audit.records)
            )
            plot_metrics(
                run.path / "metrics.jsonl",
                run.path / "curves.png",
                title=f"shielded ({party.tee}) · {cfg.model.name} · {prep.dataset.name}",
            )
            summary = {
                "mode": "shielded",
                "tee": party.tee,
                "enclave_measurement": party.enclave.measurement,
                "offload": s.offload,
                "model": cfg.model.name,
                "dataset": prep.dataset.name,
                "method": cfg.adapter["method"],
                "accelerator_crossings": crossings,
                "adapter": f"{SEALED_FILE} (sealed to the enclave measurement)",
                **{k: v for k, v in party.info.items() if k != "modules"},
                **stats,
                **result,
            }
            final = run.finish(summary)
            party.enclave.seal(final / SEALED_FILE)  # bound to its final path's counter
    except BaseException:
        run.abort()
        raise
    return final


# ---------------------------------------------------------------------- shielded-fedavg client
class ShieldedTrainer:
    """A ``shielded-fedavg`` client: its data on its host, its adapter in its own enclave.

    The federated client's :class:`~shieldtune.federated.client_app.Trainer` for Method 1. The
    global adapter reaches the enclave, and the update leaves it, only over the enclave's own
    channel to the server enclave (:class:`~shieldtune.federated.mods.PartySealedMod` relays the
    records): ``fit`` and ``evaluate`` take and return no adapter tensors. Each round trains
    the same way :class:`~shieldtune.federated.client_app.AdapterTrainer` does (fresh optimiser
    over the round's steps, the same shuffling seeds), one ``train_step`` ECALL per batch.

    Args:
        party: The node's running party (enclave + accelerator), closed by the caller.
        settings: Local training settings (:class:`LocalTraining`).
        train, test: The client's encoded shares.
        partition: Its partition id (mixes into the shuffling seeds).
        refill: ``after-step`` or ``idle`` (when the pool of unmasking factors is topped up).
    """

    def __init__(
        self,
        party: ShieldedSession,
        settings: Any,
        train: dict[str, torch.Tensor],
        test: dict[str, torch.Tensor],
        partition: int,
        refill: str = "after-step",
    ) -> None:
        self.party, self.s = party, settings
        self.train, self.test, self.partition, self.refill = train, test, partition, refill

    def _no_clear_adapter(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise IntegrityError("a clear global adapter reached the host of a shielded client")

    def fit(
        self, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
        """Local epochs inside the enclave; the update stays there (sealed by the mod)."""
        from shieldtune.data.tasks import batches

        self._no_clear_adapter(state)
        rnd = int(config.get("server-round", 1))
        n = int(self.train["labels"].shape[0])
        steps = self.s.epochs * -(-n // self.s.batch_size)
        self.party.call("new_round", {"steps": steps})
        total, count = 0.0, 0
        for epoch in range(self.s.epochs):
            seed = self.s.seed + 7919 * self.partition + 104729 * rnd  # as AdapterTrainer
            for batch in batches(
                self.train, self.s.batch_size, shuffle=True, seed=seed, epoch=epoch
            ):
                reply = self.party.call("train_step", tensors=_forward_tensors(batch, labels=True))
                if self.refill == "after-step" and self.party.accelerator is not None:
                    self.party.call("refill")
                total, count = total + float(reply.meta["loss"]), count + 1  # type: ignore[arg-type]
        return {}, n, {"train_loss": total / max(count, 1)}

    def evaluate(
        self, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """Metrics of the global adapter (loaded in the enclave) on this client's test share."""
        self._no_clear_adapter(state)

        def logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.party.call("logits", tensors=_forward_tensors(batch)).tensors["logits"]

        metrics = evaluate(
            logits,
            self.test,
            self.s.task,
            self.s.eval_batch_size,
            self.s.num_labels,
            confusion=self.s.eval_confusion,
        )
        if self.refill == "idle" and self.party.accelerator is not None:
            self.party.call("refill")
        return int(self.test["labels"].shape[0]), metrics

    def save(self, out_dir: Path) -> None:
        """Seal the adapter this client holds to its enclave (never written in the clear)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        self.party.call("checkpoint")
        self.party.enclave.seal(out_dir / SEALED_FILE)
