"""The Flower ``ServerApp`` and ``ClientApp`` of a deployed federation (loaded by Flower by name).

``shieldtune serve`` writes a Flower app folder whose ``[tool.flwr.app.components]`` point here
(``shieldtune.cli.flower_app:server_app`` / ``:client_app``) and submits it with ``flwr run``.
Flower then runs:

- ``server_app`` once per run, in a ``flwr-serverapp`` process on the server host. Its run
  config carries the server's resolved config (``shieldtune-config``, base64 YAML), an optional
  ``resume`` run folder, the federation ``fingerprint``, the grid's ``poll-s`` and a
  ``status-file`` where it writes how the run ended (``serve`` reads it for its exit code).
- ``client_app`` once per message, each time in a fresh ``flwr-clientapp`` process on a client
  host. Its node config (set by ``shieldtune join``) names the client's own resolved config
  (``shieldtune-config``: a file path; its data never leaves the host), its attestation policy
  (``shieldtune-policy``, secure-fedavg), ``partition-id`` / ``num-partitions``, optionally
  ``adapter-dir`` (where it saves each global adapter it receives) and ``worker-socket``: then
  the process forwards the message to ``join``'s warm worker (:mod:`shieldtune.cli.node_worker`)
  instead of loading the model itself. State a message must leave for the next one (the
  attested channel) lives in the node's ``Context.state`` either way.

``mode: split`` with ``split.clients > 1`` (:mod:`shieldtune.recipes.split_rounds`): the server
app also runs the split-server enclave and its relay (run config ``split-host``, ``split-port``,
``split-cert``, ``split-key``: server-host paths); a client's node config names its share
(``split-client``), the relay (``split-relay``, ``split-ca``, ``split-connect-timeout``), and it
needs the warm worker: the split node (session, SPF mask, front optimiser) lives there.

Nothing heavy is imported at module level: forwarding a message does not load torch.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from shieldtune.errors import ConfigError, ShieldtuneError
from shieldtune.federated.messages import HANDSHAKE_ACTIONS, SPLIT_FINISH, SPLIT_FINISH_ACTION

__all__ = [
    "APP_CONFIG",
    "SERVER_APP_REF",
    "CLIENT_APP_REF",
    "server_app",
    "client_app",
    "run_message",
    "warm_up",
    "encode_config",
    "decode_config",
]

SERVER_APP_REF = "shieldtune.cli.flower_app:server_app"
CLIENT_APP_REF = "shieldtune.cli.flower_app:client_app"
#: The app bundle's run config and its defaults (``flwr run --run-config`` sets them per run).
APP_CONFIG: dict[str, str | float] = {
    "shieldtune-config": "",
    "resume": "",
    "fingerprint": "",
    "poll-s": 0.5,
    "status-file": "",
    "split-host": "",
    "split-port": 0,
    "split-cert": "",
    "split-key": "",
}
log = logging.getLogger("shieldtune.federated")


def encode_config(yaml_text: str) -> str:
    """A resolved config YAML as one run-config string (base64)."""
    return base64.b64encode(yaml_text.encode()).decode()


def decode_config(value: str) -> Any:
    """The :class:`~shieldtune.config.RunConfig` of :func:`encode_config`'s string.

    Raises:
        ConfigError: Empty, not base64, or an invalid config.
    """
    import yaml

    from shieldtune.config import validate

    try:
        data = yaml.safe_load(base64.b64decode(value.encode(), validate=True).decode())
    except (ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"run config shieldtune-config is not base64 YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError("run config shieldtune-config is empty: start runs with shieldtune serve")
    return validate(data)


# ---------------------------------------------------------------------- server
server_app = ServerApp()


def _write_status(path: str, **status: Any) -> None:
    if path:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        os.replace(tmp, path)


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from shieldtune.federated.deploy import PollingGrid
    from shieldtune.recipes.federated import serve_federation

    run_config = context.run_config
    status = str(run_config.get("status-file", ""))
    try:
        cfg = decode_config(str(run_config.get("shieldtune-config", "")))
        resume = str(run_config.get("resume", "")) or None
        poll = float(run_config.get("poll-s", 0.5))  # type: ignore[arg-type]
        if cfg.mode == "split":
            run_dir = _serve_split(cfg, PollingGrid(grid, poll), run_config)
        else:
            run_dir = serve_federation(
                cfg, PollingGrid(grid, poll), resume=Path(resume) if resume else None
            )
    except ShieldtuneError as err:
        lines = err.problems if isinstance(err, ConfigError) else [str(err)]
        _write_status(status, ok=False, error=type(err).__name__, message="; ".join(lines))
        raise
    except BaseException as err:
        _write_status(status, ok=False, error=type(err).__name__, message=str(err))
        raise
    _write_status(status, ok=True, run_dir=str(run_dir))


def _serve_split(cfg: Any, grid: Grid, run_config: Any) -> Path:
    from shieldtune.recipes.split_rounds import serve_split_rounds

    cert, key = str(run_config.get("split-cert", "")), str(run_config.get("split-key", ""))
    tls = (Path(cert).read_bytes(), Path(key).read_bytes()) if cert else None
    host = str(run_config.get("split-host", "")) or "127.0.0.1"
    port = int(run_config.get("split-port", 0))  # type: ignore[call-overload]
    return serve_split_rounds(cfg, grid, host=host, port=port, tls=tls)


# ---------------------------------------------------------------------- client
@dataclass
class _Node:
    """One client host's settings (read once per process)."""

    cfg: Any
    mods: list[Any]
    trainer_for: Callable[[Context], Any]
    adapter_dir: Path | None
    split: Any = None  # mode split: the SplitNode (session, mask, optimiser) of this host


_nodes: dict[tuple[str, str, str], _Node] = {}  # per-process caches, never protocol state
_local: dict[int, ClientApp] = {}  # run id -> the ClientApp doing the work


def _node(context: Context) -> _Node:
    nc = context.node_config
    config_path = str(nc.get("shieldtune-config", ""))
    policy_path = str(nc.get("shieldtune-policy", ""))
    adapter_dir = str(nc.get("adapter-dir", ""))
    key = (config_path, policy_path, adapter_dir)
    if key not in _nodes:
        from shieldtune.config import load_config
        from shieldtune.recipes.federated import node_client_mods, node_trainer_factory

        if not config_path:
            raise ConfigError("node config has no shieldtune-config: start with `shieldtune join`")
        cfg = load_config(config_path)
        policy = None
        if cfg.mode in ("secure-fedavg", "split"):
            from shieldtune.tee.attestation import Policy

            if not policy_path:
                raise ConfigError(f"node config has no shieldtune-policy ({cfg.mode})")
            policy = Policy.load(Path(policy_path))
        if cfg.mode == "split":
            _nodes[key] = _split_node(cfg, policy, nc)
            return _nodes[key]
        _nodes[key] = _Node(
            cfg,
            node_client_mods(cfg, policy),
            node_trainer_factory(cfg),
            Path(adapter_dir) if adapter_dir else None,
        )
    return _nodes[key]


def _split_node(cfg: Any, policy: Any, nc: Any) -> _Node:
    """A split client's node: its SplitNode (connected and verified) and the sealing mod."""
    from shieldtune.federated.mods import SealedUpdateMod
    from shieldtune.recipes.split_rounds import SplitNode
    from shieldtune.tee.attestation import Verifier

    ca = str(nc.get("split-ca", ""))
    node = SplitNode(
        cfg,
        client=int(nc.get("split-client", 0)),  # type: ignore[call-overload]
        relay=str(nc.get("split-relay", "")),
        platform_keys=list(policy.simulated_platform_keys),
        root_certificates=Path(ca).read_bytes() if ca else None,
        connect_timeout_s=float(nc.get("split-connect-timeout", 120.0)),  # type: ignore[arg-type]
    )
    mods = [SealedUpdateMod(lambda: Verifier(policy))]
    return _Node(cfg, mods, node.trainer_for, None, node)


def _local_app(run_id: int) -> ClientApp:
    """The ClientApp that does the work (one per run: round 1 starts from a fresh adapter)."""
    if run_id in _local:
        return _local[run_id]
    from shieldtune.federated.client_app import build_client_app
    from shieldtune.federated.deploy import check_fingerprint

    def node_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """Check the federation fingerprint, then run this node's mods (sealing)."""
        try:
            node = _node(context)
            check_fingerprint(node.cfg, str(context.run_config.get("fingerprint", "")))
        except ShieldtuneError as err:
            log.error("node %s refuses the message: %s", context.node_id, err)
            reason = f"{type(err).__name__}: {err}"
            return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, reason), reply_to=msg)

        def chain(i: int) -> ClientAppCallable:
            if i == len(node.mods):
                return call_next
            return lambda m, c: node.mods[i](m, c, chain(i + 1))

        reply = chain(0)(msg, context)
        kind = msg.metadata.message_type.split(".")[0]
        if kind == "evaluate" and node.adapter_dir is not None and not reply.has_error():
            trainer = app.trainers.get(context.node_id)  # type: ignore[attr-defined]
            if trainer is not None:
                trainer.save(node.adapter_dir)  # the global adapter it just evaluated
        return reply

    app = build_client_app(lambda context: _node(context).trainer_for(context), [node_mod])
    _local.clear()  # a new run: drop the previous run's trainers
    _local[run_id] = app
    return app


def warm_up(node_config: dict[str, Any]) -> Any:
    """Load this node's config, data and model before the first message (node worker).

    Returns:
        The split node (mode split: connected to the split server and verified), else None.
    """
    from flwr.app import RecordDict

    context = Context(
        run_id=0, node_id=0, node_config=dict(node_config), state=RecordDict(), run_config={}
    )
    node = _node(context)
    node.trainer_for(context)
    return node.split


def run_message(msg: Message, context: Context) -> Message:
    """Run one message with this process's ClientApp (what the node worker calls)."""
    if msg.metadata.message_type == SPLIT_FINISH:
        return _finish(msg, context)
    return _local_app(context.run_id)(msg, context)


def _finish(msg: Message, context: Context) -> Message:
    """The federation is over: a split node writes its run folder and reports."""
    from flwr.app import MetricRecord, RecordDict

    split = _node(context).split
    if split is None:
        reason = "only split clients answer shieldtune_split_finish"
        return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, reason), reply_to=msg)
    return Message(RecordDict({"metrics": MetricRecord(split.finish())}), reply_to=msg)


def _dispatch(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Forward to ``join``'s warm node worker if it has one, else run here."""
    path = str(context.node_config.get("worker-socket", ""))
    if path:
        from shieldtune.cli.node_worker import forward

        return forward(path, msg, context)
    return run_message(msg, context)


#: What Flower loads: a thin dispatcher (cheap to start in each message's fresh process).
client_app = ClientApp(mods=[_dispatch])


def _never(msg: Message, context: Context) -> Message:  # pragma: no cover
    raise AssertionError("dispatched by the mod")


for _register in (
    client_app.train(),
    client_app.evaluate(),
    *(client_app.query(action) for action in (*HANDSHAKE_ACTIONS, SPLIT_FINISH_ACTION)),
):
    _register(_never)
