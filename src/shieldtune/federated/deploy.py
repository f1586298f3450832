"""Flower deployment plumbing: the app bundle, a faster-polling grid, waiting for nodes.

A multi-machine federation runs on Flower's own deployment runtime: a SuperLink (one HTTPS port
for its Fleet, Control and Runtime APIs), one SuperNode per client, and a run submitted with
``flwr run APP_DIR CONNECTION``. :func:`write_app_bundle` writes the ``APP_DIR`` (a
``pyproject.toml`` whose ``[tool.flwr.app.components]`` name the installed shieldtune
``ServerApp`` and ``ClientApp`` objects; Flower builds a FAB from it). ``shieldtune serve`` and
``shieldtune join`` start these processes (see :mod:`shieldtune.cli.serve`).

:class:`PollingGrid` wraps the deployment's grid: Flower's ``send_and_receive`` sleeps 3 s
between polls of the SuperLink; the wrapper polls every ``interval_s``, which shortens each
message round trip without changing what is sent.

Also here (cheap to import on every host): what the parties of one federation must agree on
(:func:`federation_fingerprint`), the server enclave's program config and what a client trusts
(:func:`client_policy`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from shieldtune.config import RunConfig
from shieldtune.errors import ConfigError

__all__ = [
    "ENCLAVE_PROGRAM",
    "SPARSE_ENCLAVE_PROGRAM",
    "SECURE_MODES",
    "PollingGrid",
    "wait_for_nodes",
    "write_app_bundle",
    "enclave_config",
    "enclave_program",
    "client_policy",
    "federation_fingerprint",
    "check_fingerprint",
    "check_secure_opt_in",
]

ENCLAVE_PROGRAM = "fedavg"
#: The aggregation program of split clients' SPF deltas (the split modes).
SPARSE_ENCLAVE_PROGRAM = "fedavg-sparse"
#: Modes whose aggregation runs in the server's ``fedavg`` enclave.
SECURE_MODES = ("secure-fedavg", "shielded-fedavg")


class PollingGrid(Grid):
    """A Flower ``Grid`` that delegates everything and polls replies every ``interval_s``.

    Args:
        grid: The deployment's grid (``HttpGrid``).
        interval_s: Seconds between pulls while waiting for replies.
    """

    def __init__(self, grid: Grid, interval_s: float = 0.5) -> None:
        self.grid = grid
        self.interval_s = interval_s

    def set_run(self, run: Run) -> None:
        """Set the run this grid operates in."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """The run."""
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """As the wrapped grid."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Ids of the connected nodes."""
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push to the SuperLink."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull ready replies from the SuperLink."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull every ``interval_s`` until all replied or ``timeout`` passed."""
        pending = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (timeout is not None and time.monotonic() >= end):
                break
            time.sleep(self.interval_s)
        return replies


def wait_for_nodes(grid: Grid, want: int, minimum: int, timeout_s: float) -> list[int]:
    """Wait until ``want`` nodes are connected, or ``timeout_s`` passed with ``minimum`` of them.

    Flower's strategies start a round as soon as their minimum is connected; waiting here for
    the whole federation first makes round 1 include every client that joined in time.

    Returns:
        The connected node ids.

    Raises:
        ConfigError: Fewer than ``minimum`` nodes connected within ``timeout_s``.
    """
    end = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want:
            return nodes
        if time.monotonic() >= end:
            if len(nodes) >= minimum:
                return nodes
            raise ConfigError(
                f"{len(nodes)} client node(s) connected within {timeout_s:.0f} s, fewer than "
                f"federated.min_clients ({minimum}); start them with `shieldtune join`"
            )
        time.sleep(0.5)


def write_app_bundle(
    folder: Path,
    *,
    server_app: str,
    client_app: str,
    config: Mapping[str, str | int | float | bool],
    version: str = "1.0.0",
) -> Path:
    """Write the ``pyproject.toml`` of a Flower app that runs installed ``ServerApp`` and
    ``ClientApp`` objects (``flwr run FOLDER CONNECTION`` builds a FAB from it).

    Args:
        folder: The app folder (created; only the ``pyproject.toml`` goes in it).
        server_app: ``module:attribute`` of the ``ServerApp``.
        client_app: ``module:attribute`` of the ``ClientApp``.
        config: Default run config (``[tool.flwr.app.config]``); ``flwr run --run-config``
            may override only keys listed here.
        version: The app's version (part of the FAB id).

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def value(v: str | int | float | bool) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(v)  # a TOML basic string is a JSON string

    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "shieldtune-federation"',
        f"version = {json.dumps(version)}",
        'description = "shieldtune federated fine-tuning (plain-fedavg / secure-fedavg)"',
        'license = "Apache-2.0"',
        "dependencies = []  # the shieldtune package is installed on every host",
        "",
        "[tool.flwr.app]",
        'publisher = "shieldtune"',
        "",
        "[tool.flwr.app.components]",
        f"serverapp = {json.dumps(server_app)}",
        f"clientapp = {json.dumps(client_app)}",
        "",
        "[tool.flwr.app.config]",
        *(f"{json.dumps(k)} = {value(v)}" for k, v in config.items()),
        "",
    ]
    (folder / "pyproject.toml").write_text("\n".join(lines))
    return folder


# ---------------------------------------------------------------------- agreement
def _split(cfg: RunConfig) -> bool:
    return cfg.mode in ("split", "plain-split")


def enclave_program(cfg: RunConfig) -> str:
    """The aggregation enclave's program: ``fedavg``, or ``fedavg-sparse`` for split modes."""
    return SPARSE_ENCLAVE_PROGRAM if _split(cfg) else ENCLAVE_PROGRAM


def enclave_config(cfg: RunConfig) -> dict[str, Any]:
    """The aggregation enclave program's config (part of its measurement).

    Split modes aggregate their clients' SPF deltas (``fedavg-sparse``), with the DP settings.
    """
    f = cfg.federated
    out: dict[str, Any] = {
        "max_update_bytes": int(f.max_update_mb * 2**20),
        "min_updates": f.min_clients,
    }
    if _split(cfg):
        out.update(dp_clip=cfg.split.dp_clip, dp_sigma=float(cfg.split.dp_sigma))
    return out


def client_policy(cfg: RunConfig, platform_keys: list[str] | None = None) -> Any:
    """What a client trusts: the ``fedavg`` measurement it computes from its own copy of the
    code and config, simulated enclaves only with ``federated.allow_simulated`` (split modes:
    ``split.allow_simulated``), and (simulated) the platform keys given."""
    from shieldtune.tee.attestation import Policy
    from shieldtune.tee.program import measure_program

    split = _split(cfg)
    return Policy(
        allow_simulated=cfg.split.allow_simulated if split else cfg.federated.allow_simulated,
        simulated_platform_keys=list(platform_keys or []),
        allowed_measurements=[measure_program(enclave_program(cfg), enclave_config(cfg))],
    )


def federation_fingerprint(cfg: RunConfig) -> str:
    """SHA-256 of what every party of one federation must agree on: mode, model, adapter,
    optimisation (incl. the seed of the shared initial adapter), local epochs and (split
    modes) the split settings."""
    t = cfg.train
    shared = {
        "mode": cfg.mode,
        "model": cfg.model.model_dump(mode="json"),
        "adapter": cfg.adapter,
        "train": t.model_dump(
            mode="json",
            include={
                "batch_size",
                "lr",
                "weight_decay",
                "schedule",
                "warmup_ratio",
                "grad_clip",
                "seed",
                "precision",
            },
        ),
        "local_epochs": cfg.federated.local_epochs,
    }
    if _split(cfg):  # cut, front adapter, clients, server adapter, DP
        shared["split"] = cfg.split.model_dump(mode="json", exclude={"allow_simulated"})
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()


def check_secure_opt_in(cfg: RunConfig) -> None:
    f = cfg.federated
    if cfg.mode in SECURE_MODES and f.backend == "simulated" and not f.allow_simulated:
        raise ConfigError(
            f"federated.allow_simulated: {cfg.mode} on the 'simulated' backend gives NO "
            "hardware protection; set federated.allow_simulated=true to run it anyway"
        )


def check_fingerprint(cfg: RunConfig, expected: str) -> None:
    """Refuse a client whose config differs from the server's in what must be shared.

    Raises:
        ConfigError: The fingerprints differ.
    """
    if expected and expected != federation_fingerprint(cfg):
        raise ConfigError(
            "this client's config differs from the server's in mode, model, adapter, train "
            "settings or local_epochs (federation fingerprint mismatch); use the same config"
        )
