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
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

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

mode: split verifies the split-server enclave (its measurement computed here from this host's
code and config), trains this client's front slice against it and writes this client's run
folder; --client N picks share N of split.clients.
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
    if cfg.federated.allow_simulated and not trusted:
        raise ConfigError(
            "a simulated server enclave is verified by its platform key: pass "
            "--trust-platform-key KEY (shieldtune serve prints it) or --policy FILE"
        )
    return client_policy(cfg, trusted)


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
    """Validate, write this node's private settings, run the SuperNode until interrupted.

    Returns:
        Exit code 0 after an interrupt (errors are raised as :class:`ShieldtuneError`).
    """
    from shieldtune.recipes._common import load_dataset

    cfg = load_config(config, overrides)
    if cfg.mode == "split":
        from shieldtune.cli.split_deploy import join_split_command

        unused = {
            "--partition-id": partition_id,
            "--num-partitions": num_partitions,
            "--policy": policy_file,
            "--runtime-port": runtime_port,
            "--save-adapter": adapter_dir,
        }
        given = [name for name, value in unused.items() if value is not None]
        if given or not worker:
            given += [] if worker else ["--no-worker"]
            raise ConfigError(
                f"{', '.join(given)}: not used by mode split (its share is --client N of "
                "split.clients; the policy is computed from the config)"
            )
        return join_split_command(
            cfg,
            server=server,
            client=client or 0,
            certs=certs,
            insecure=insecure,
            trusted_keys=trusted_keys,
            connect_timeout_s=connect_timeout_s,
        )
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
    if insecure and certs is not None:
        raise ConfigError("--insecure and --certs exclude each other")
    ca = None if insecure else tls_files(certs, ["ca.pem"])[0]
    if runtime_port is not None and not 0 < runtime_port < 65536:
        raise ConfigError(f"--runtime-port {runtime_port} is outside 1..65535")
    policy = _policy(cfg, policy_file, trusted_keys) if cfg.mode == "secure-fedavg" else None
    quiet_libraries()
    load_dataset(cfg)  # a missing or malformed table is refused here, not in round 1

    state = Path(tempfile.mkdtemp(prefix="shieldtune-join-"))  # mode 0700
    home = state / "flwr-home"
    home.mkdir()
    (state / "config.yaml").write_text(to_yaml(cfg))
    node_config = {
        "partition-id": partition_id,
        "num-partitions": num_partitions,
        "shieldtune-config": str(state / "config.yaml"),
    }
    if policy is not None:
        (state / "policy.json").write_text(policy.model_dump_json())
        node_config["shieldtune-policy"] = str(state / "policy.json")
    if adapter_dir is not None:
        node_config["adapter-dir"] = str(adapter_dir.resolve())
    node_worker = None
    if worker:
        from shieldtune.cli.flower_app import run_message, warm_up
        from shieldtune.cli.node_worker import NodeWorker

        node_worker = NodeWorker(state / "worker.sock", run_message).start()
        node_config["worker-socket"] = str(node_worker.path)
        warm_up(node_config)
    (state / "node-config.toml").write_text(
        "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in node_config.items())
    )
    port_rt = runtime_port or free_port()
    argv = [flower_exe("flower-supernode"), "--superlink", f"{host}:{port}"]
    argv += ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
    argv += ["--host", "127.0.0.1", "--port", str(port_rt)]
    argv += ["--node-config", str(state / "node-config.toml")]
    tls = "TLS" if ca is not None else "NO TLS (--insecure)"
    console.print(
        f"{cfg.mode} client: partition {partition_id} of {num_partitions}, server "
        f"{host}:{port} ({tls}); Ctrl-C to leave"
    )
    if cfg.mode == "secure-fedavg" and cfg.federated.allow_simulated:
        console.print(
            "[bold yellow]accepting a SIMULATED server enclave (no hardware protection)[/]"
        )
    node: Child | None = None
    try:
        with sigterm_as_interrupt():
            node = Child("flower-supernode", argv, flower_env(home))
            code = node.proc.wait()
            raise ShieldtuneError(f"the SuperNode exited with code {code}")
    except KeyboardInterrupt:
        console.print("left the federation")
        return 0
    finally:
        if node is not None:
            node.stop()
        if node_worker is not None:
            node_worker.stop()
        shutil.rmtree(state, ignore_errors=True)
