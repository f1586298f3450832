"""``shieldtune join CONFIG --server HOST:PORT``: a client of a multi-machine federation.

Starts a Flower SuperNode (``flower-supernode``) that connects to the server's SuperLink over
TLS and runs shieldtune's ``ClientApp`` (:mod:`shieldtune.cli.flower_app`) for every message
the server sends, each in a fresh process. The client's data, config and (secure-fedavg)
attestation policy stay on this host: the SuperNode's node config only names the files.

The policy (secure-fedavg) accepts exactly the ``fedavg`` enclave measurement this host
computes from its own copy of the code and the config; a SIMULATED server enclave (no hardware
protection) needs ``federated.allow_simulated: true`` and its platform key pinned with
``--trust-platform-key`` (``shieldtune serve`` prints it). ``--policy FILE`` replaces the whole
policy (e.g. for SGX / TDX / SEV-SNP servers).

Flower runs each message in a fresh ClientApp process; by default that process forwards the
message to a warm worker in this command's process (:mod:`shieldtune.cli.node_worker`: model
and data loaded once, not once per message). ``--no-worker`` does all work in the fresh process.

It runs until interrupted (Ctrl-C or SIGTERM): a SuperNode serves every run of its SuperLink.

``mode: split``: one client (``split.clients: 1``) needs no Flower: :mod:`shieldtune.cli.
split_deploy` trains against the relay at ``--server`` and ends with the run. With several
clients the relay is at ``--server`` and the SuperLink one port above; the split node (session
with the split enclave, SPF mask, front optimiser) lives in this process's worker for the whole
federation, and ``join`` ends once the server's finish message arrived and the server stopped.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shieldtune.cli._common import console, quiet_libraries
from shieldtune.cli._flower import (
    Child,
    flower_env,
    flower_exe,
    free_port,
    parse_address,
    sigterm_as_interrupt,
    tls_files,
)
from shieldtune.config import load_config, to_yaml
from shieldtune.errors import ConfigError, ShieldtuneError

__all__ = ["EPILOG", "join_command"]

EPILOG = """Examples (client host 0 of 2; ca.pem copied from the server):

  shieldtune join configs/federated/secure_fedavg_tiny.yaml --server fed.example.org:9092
  --certs certs --partition-id 0 --num-partitions 2 --trust-platform-key KEY

  shieldtune join configs/split/spf_lora_tiny.yaml --server fed.example.org:9093
  --certs certs --trust-platform-key KEY

  shieldtune join configs/split/multi_spf_lora_tiny.yaml --server fed.example.org:9093
  --client 1 --certs certs --trust-platform-key KEY

mode: split verifies the split-server enclave (its measurement computed here from this host's
code and config), trains this client's front slice against it and writes this client's run
folder; --client N picks share N of split.clients (with several clients the SuperLink is at
the next port, and join ends once the server has finished the federation).
"""


def _policy(cfg, policy_file: Path | None, trusted: list[str]):
    from shieldtune.federated.deploy import client_policy
    from shieldtune.tee.attestation import Policy

    if policy_file is not None:
        policy = Policy.load(policy_file)
        if trusted:
            keys = [*policy.simulated_platform_keys, *trusted]
            policy = Policy.model_validate({**policy.model_dump(), "simulated_platform_keys": keys})
        return policy
    opted_in = cfg.split.allow_simulated if cfg.mode == "split" else cfg.federated.allow_simulated
    if opted_in and not trusted:
        raise ConfigError(
            "a simulated server enclave is verified by its platform key: pass "
            "--trust-platform-key KEY (shieldtune serve prints it) or --policy FILE"
        )
    return client_policy(cfg, trusted)


@dataclass
class _Plan:
    """Where this node connects and what its node config holds beyond the common keys."""

    link: str  # HOST:PORT of the SuperLink
    node_config: dict[str, Any]
    banner: str
    policy: Any = None


def _federated_plan(cfg, server, partition_id, num_partitions, client) -> _Plan:
    if cfg.mode not in ("plain-fedavg", "secure-fedavg"):
        raise ConfigError(
            f"mode: shieldtune join runs split, plain-fedavg or secure-fedavg, not {cfg.mode!r}"
        )
    if client is not None:
        raise ConfigError("--client: mode split only; federated clients take --partition-id")
    if partition_id is None or num_partitions is None:
        raise ConfigError(
            f"{cfg.mode} needs --partition-id and --num-partitions (this client's share)"
        )
    host, port = parse_address(server, "--server")
    if num_partitions < 1:
        raise ConfigError(f"--num-partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"--partition-id {partition_id} is outside 0..{num_partitions - 1}")
    share = {"partition-id": partition_id, "num-partitions": num_partitions}
    banner = f"{cfg.mode} client: partition {partition_id} of {num_partitions}, server"
    return _Plan(f"{host}:{port}", share, f"{banner} {host}:{port}")


def _split_plan(cfg, server, client, connect_timeout_s: float) -> _Plan:
    """mode split, split.clients > 1: relay at --server, SuperLink one port above."""
    host, port = parse_address(server, "--server")
    if port >= 65535:
        raise ConfigError(f"--server port {port}: split needs it and the next one (SuperLink)")
    relay = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    link = f"[{host}]:{port + 1}" if ":" in host else f"{host}:{port + 1}"
    node_config = {
        "partition-id": client,
        "num-partitions": cfg.split.clients,
        "split-client": client,
        "split-relay": relay,
        "split-connect-timeout": float(connect_timeout_s),
    }
    banner = f"split client {client} of {cfg.split.clients}: relay {relay}, SuperLink {link}"
    return _Plan(link, node_config, banner)


def join_command(
    config: Path | None,
    overrides: list[str],
    *,
    server: str,
    partition_id: int | None,
    num_partitions: int | None,
    certs: Path | None,
    insecure: bool,
    trusted_keys: list[str],
    policy_file: Path | None,
    runtime_port: int | None,
    adapter_dir: Path | None,
    worker: bool = True,
    client: int | None = None,
    connect_timeout_s: float = 120.0,
) -> int:
    """Validate, write this node's private settings, run the SuperNode until interrupted (a
    split client: until the federation told it that it is over).

    Returns:
        Exit code 0 (errors are raised as :class:`ShieldtuneError`).
    """
    from shieldtune.recipes._common import load_dataset

    cfg = load_config(config, overrides)
    split = cfg.mode == "split"
    if split:
        _refuse_split_options(cfg, partition_id, num_partitions, policy_file, adapter_dir, worker)
        if not 0 <= (client or 0) < cfg.split.clients:
            raise ConfigError(
                f"--client {client} is outside 0..{cfg.split.clients - 1} (split.clients is "
                f"{cfg.split.clients})"
            )
        if connect_timeout_s <= 0:
            raise ConfigError(f"--connect-timeout must be > 0 seconds, got {connect_timeout_s}")
    if split and cfg.split.clients == 1:
        from shieldtune.cli.split_deploy import join_split_command

        if runtime_port is not None:
            raise ConfigError("--runtime-port: a single split client runs no SuperNode")
        return join_split_command(
            cfg,
            server=server,
            client=client or 0,
            certs=certs,
            insecure=insecure,
            trusted_keys=trusted_keys,
            connect_timeout_s=connect_timeout_s,
        )
    if split:
        plan = _split_plan(cfg, server, client or 0, connect_timeout_s)
    else:
        plan = _federated_plan(cfg, server, partition_id, num_partitions, client)
    if insecure and certs is not None:
        raise ConfigError("--insecure and --certs exclude each other")
    ca = None if insecure else tls_files(certs, ["ca.pem"])[0]
    if split:
        plan.node_config["split-ca"] = str(ca) if ca is not None else ""
    if runtime_port is not None and not 0 < runtime_port < 65536:
        raise ConfigError(f"--runtime-port {runtime_port} is outside 1..65535")
    if cfg.mode in ("secure-fedavg", "split"):
        plan.policy = _policy(cfg, policy_file, trusted_keys)
    quiet_libraries()
    load_dataset(cfg)  # a missing or malformed table is refused here, not in round 1
    tls = "TLS" if ca is not None else "NO TLS (--insecure)"
    console.print(f"{plan.banner} ({tls}); Ctrl-C to leave")
    opted_in = cfg.split.allow_simulated if split else cfg.federated.allow_simulated
    if cfg.mode != "plain-fedavg" and opted_in:
        console.print(
            "[bold yellow]accepting a SIMULATED server enclave (no hardware protection)[/]"
        )
    return _run_node(cfg, plan, ca, runtime_port, adapter_dir, worker)


def _refuse_split_options(cfg, partition_id, num_partitions, policy_file, adapter_dir, worker):
    unused = {
        "--partition-id": partition_id,
        "--num-partitions": num_partitions,
        "--policy": policy_file,
        "--save-adapter": adapter_dir,
    }
    given = [name for name, value in unused.items() if value is not None]
    given += [] if worker else ["--no-worker"]
    if given:
        raise ConfigError(
            f"{', '.join(given)}: not used by mode split (its share is --client N of "
            "split.clients; its policy is computed from the config; its state needs the worker)"
        )


def _run_node(
    cfg, plan: _Plan, ca: Path | None, runtime_port: int | None, adapter_dir, worker: bool
) -> int:
    """Write the node's private settings, start the worker (warm: model, data; split: its
    verified session), run the SuperNode until interrupted or (split) the federation is over."""
    state = Path(tempfile.mkdtemp(prefix="shieldtune-join-"))  # mode 0700
    home = state / "flwr-home"
    home.mkdir()
    (state / "config.yaml").write_text(to_yaml(cfg))
    node_config = {**plan.node_config, "shieldtune-config": str(state / "config.yaml")}
    if plan.policy is not None:
        (state / "policy.json").write_text(plan.policy.model_dump_json())
        node_config["shieldtune-policy"] = str(state / "policy.json")
    if adapter_dir is not None:
        node_config["adapter-dir"] = str(adapter_dir.resolve())
    node_worker = split = node = None
    try:
        with sigterm_as_interrupt():
            if worker:
                from shieldtune.cli.flower_app import run_message, warm_up
                from shieldtune.cli.node_worker import NodeWorker

                node_worker = NodeWorker(state / "worker.sock", run_message).start()
                node_config["worker-socket"] = str(node_worker.path)
                split = warm_up(node_config)
            (state / "node-config.toml").write_text(
                "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in node_config.items())
            )
            argv = [flower_exe("flower-supernode"), "--superlink", plan.link]
            argv += ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
            argv += ["--host", "127.0.0.1", "--port", str(runtime_port or free_port())]
            argv += ["--node-config", str(state / "node-config.toml")]
            node = Child("flower-supernode", argv, flower_env(home))
            while node.alive() and not (split is not None and split.done.is_set()):
                time.sleep(0.5)
            if split is not None and split.done.is_set():
                _wait_closed(plan.link)  # the server has our last reply once it stops
                console.print(f"the federation is over: run folder {split.run.final}")
                return 0
            raise ShieldtuneError(f"the SuperNode exited with code {node.proc.returncode}")
    except KeyboardInterrupt:
        console.print("left the federation")
        return 0
    finally:
        if node is not None:
            node.stop()
        if split is not None:
            split.close()
        if node_worker is not None:
            node_worker.stop()
        shutil.rmtree(state, ignore_errors=True)


def _wait_closed(address: str, timeout_s: float = 60.0) -> None:
    """Wait until ``address`` stops accepting connections (or ``timeout_s`` passed)."""
    host, port = parse_address(address, "SuperLink")
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                pass
        except OSError:
            return
        time.sleep(0.5)
