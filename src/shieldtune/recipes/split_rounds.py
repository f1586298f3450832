"""Recipe ``split`` with ``split.clients > 1`` across machines: the rounds on Flower's deployment.

The same server and client code as the one-machine federated split
(:mod:`~shieldtune.recipes.split_federated`), run by ``shieldtune serve`` and ``join``::

    server host  shieldtune serve: Flower SuperLink (--port + 1) and, in the deployment's
                 ServerApp process (:func:`serve_split_rounds`): the split-server enclave and its
                 relay (--host/--port, TLS), the fedavg-sparse enclave, the rounds on the
                 SuperLink's grid, then the server's run folder
    client host  shieldtune join --client N: a :class:`SplitNode` in join's own process (its warm
                 node worker) and a Flower SuperNode whose per-message ClientApp processes
                 forward every message to it

Flower 1.42 runs each message in a fresh ClientApp process; a split client's state cannot live
in ``Context.state``: its gRPC session with the split server (per_client adapters are keyed by
that session), its SPF mask and its front optimiser's moments. So the node lives in ``join``'s
process for the whole federation (``--no-worker`` is refused for split); only the sealed-update
channel to the aggregation enclave travels in ``Context.state``, as in secure-fedavg. The node
connects and verifies the split enclave before its SuperNode starts, so a refused enclave ends
``join`` at once with the attestation exit code.

After the last round the server checkpoints and seals the split server's state, then sends every
node ``query.shieldtune_split_finish``: the node writes its run folder (metrics per step and
round, its front delta, summary with steps and wire bytes), ends its session and reports its
steps and wire bytes, which the server's summary lists.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from shieldtune.config import RunConfig
from shieldtune.federated.deploy import PollingGrid, wait_for_nodes
from shieldtune.federated.messages import SPLIT_FINISH
from shieldtune.federated.server_app import start_rounds
from shieldtune.recipes._common import load_splits, open_run, prepare
from shieldtune.recipes.federated import node_trainer_factory
from shieldtune.recipes.split_clients import Link, SplitSettings, SplitTrainer
from shieldtune.recipes.split_federated import (
    checkpoint_split_server,
    finish_split_server,
    open_split_server,
    round_summary,
    split_schedule,
    step_log,
)
from shieldtune.split.service import SIMULATED_TEE, connect, split_policy

__all__ = ["deployed_schedule", "serve_split_rounds", "SplitNode"]


def deployed_schedule(cfg: RunConfig) -> tuple[list[Any], list[int], dict[str, Any]]:
    """:func:`split_schedule` from the dataset's labels and row counts (nothing tokenised, no
    model): what the server host computes."""
    ds, train_ds, test_ds = load_splits(cfg)
    labels = [ex.label for ex in train_ds.examples] if cfg.model.task == "seq-cls" else None
    return split_schedule(cfg, ds.num_labels, labels, len(train_ds), len(test_ds))


def serve_split_rounds(
    cfg: RunConfig,
    grid: Grid,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: tuple[bytes, bytes] | None = None,
    wait_for_clients_s: float | None = None,
    finish_timeout_s: float = 60.0,
) -> Path:
    """The deployment's server side of a federated split run; writes the server's run folder.

    Args:
        cfg: The run config (``mode: split``, ``split.clients > 1``).
        grid: The SuperLink's grid (from Flower's ``ServerApp`` main).
        host: Interface of the split relay.
        port: Port of the split relay.
        tls: ``(certificate PEM, key PEM)`` of the relay; None: plaintext gRPC.
        wait_for_clients_s: How long to wait for ``split.clients`` nodes before round 1
            (default: ``federated.round_timeout_s``); goes on with ``min_clients`` of them.
        finish_timeout_s: How long to wait for the nodes' finish reports.

    Returns:
        The completed run folder (metrics per round, sealed split-server state, both enclaves'
        audit logs, summary).
    """
    f = cfg.federated
    shares, steps, program = deployed_schedule(cfg)
    relay = {"host": host, "port": port, "tls": tls}
    server = open_split_server(cfg, program, relay=relay)
    try:
        polling = grid if isinstance(grid, PollingGrid) else PollingGrid(grid)
        wait = f.round_timeout_s if wait_for_clients_s is None else wait_for_clients_s
        wait_for_nodes(polling, cfg.split.clients, f.min_clients, wait)
        t0 = time.perf_counter()
        start_rounds(server.strategy, polling, f.rounds, f.round_timeout_s)
        train_time = time.perf_counter() - t0
        summary = round_summary(cfg, shares, server, train_time)
        summary.update(role="server", planned_client_steps=steps, relay_tls=tls is not None)
        checkpoint_split_server(server, summary)
        summary.update(_finish_nodes(polling, finish_timeout_s))
        final = finish_split_server(server, summary)
    except BaseException:
        server.run.abort()
        raise
    finally:
        server.stack.close()
    return final


def _finish_nodes(grid: Grid, timeout_s: float) -> dict[str, Any]:
    """Tell every node the federation is over; collect what they report."""
    nodes = sorted(grid.get_node_ids())
    messages = [Message(RecordDict(), dst_node_id=n, message_type=SPLIT_FINISH) for n in nodes]
    reports = []
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        if not reply.has_error() and "metrics" in reply.content:
            reports.append({k: v for k, v in reply.content["metrics"].items()})
    reports.sort(key=lambda r: r.get("client", -1))
    return {
        "client_reports": reports,
        "client_steps": [int(r["steps"]) for r in reports],  # type: ignore[call-overload]
    }


class SplitNode:
    """One split client of a deployed federation, alive in ``join``'s process for the whole run.

    Built before the node's SuperNode starts: loads the data, takes share ``client`` of
    ``split.clients`` (as the simulation partitions), connects to the split relay and verifies
    its enclave (measurement from this host's code and config), attaches the front adapter
    (SPF warm-up through the server). Then Flower's messages reach it through the node worker:
    it is the ClientApp's :class:`~shieldtune.federated.client_app.Trainer` (logging each round
    into the client's run folder) and answers the server's finish message.

    Args:
        cfg: The run config (the same as the server's).
        client: This client's share.
        relay: ``host:port`` of the split relay.
        platform_keys: Pinned platform keys of a simulated enclave.
        root_certificates: CA PEM of the relay's TLS certificate; None: plaintext gRPC.
        connect_timeout_s: How long to wait for the relay to be reachable.

    Attributes:
        done: Set once the run folder is written (the federation is over for this node).
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        client: int,
        relay: str,
        platform_keys: list[str],
        root_certificates: bytes | None = None,
        connect_timeout_s: float = 120.0,
    ) -> None:
        from shieldtune.recipes.split_deploy import check_trust

        check_trust(cfg, platform_keys)
        s = cfg.split
        prep = prepare(cfg)
        labels = prep.train["labels"].tolist() if cfg.model.task == "seq-cls" else None
        n_train, n_test = len(prep.train["labels"]), len(prep.test["labels"])
        _, steps, program = split_schedule(cfg, prep.num_labels, labels, n_train, n_test)
        trust = split_policy(
            program, allow_simulated=s.allow_simulated, simulated_platform_keys=platform_keys
        )

        def link() -> Link:
            remote, transport = connect(
                relay,
                trust,
                wire_dtype=s.wire_dtype,
                root_certificates=root_certificates,
                connect_timeout_s=connect_timeout_s,
            )
            counters = lambda: (transport.bytes_sent, transport.bytes_received)  # noqa: E731
            return Link(remote, transport.close, counters)

        self.cfg, self.client, self.relay = cfg, client, relay
        self.tls = root_certificates is not None
        self.done = threading.Event()
        self.history: list[dict[str, Any]] = []
        front_lr = cfg.train.front_lr or cfg.train.lr

        def build(settings: Any, train: dict, test: dict, part: int) -> SplitTrainer:
            split = SplitSettings(s.cut, s.front_adapter, front_lr, steps[part])
            return SplitTrainer(settings, split, train, test, part, link, step_log(self))

        share = {"partition-id": client, "num-partitions": s.clients}
        context = Context(run_id=0, node_id=0, node_config=share, state=RecordDict(), run_config={})
        self.trainer: SplitTrainer = node_trainer_factory(cfg, prep, build)(context)  # type: ignore[assignment]
        self.run = open_run(cfg)  # once the server is verified: a refused one leaves no folder
        self._lock = threading.Lock()

    def log(self, **record: Any) -> None:
        """Append a metrics line to the client's run folder."""
        self.run.log(**record)

    def trainer_for(self, context: Context) -> SplitNode:
        """This node, whatever the context (one client per ``join``)."""
        return self

    def fit(
        self, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
        """The split trainer's round; one ``train`` line per round in the client's folder."""
        update, n, metrics = self.trainer.fit(state, config)
        rnd = int(config.get("server-round", 1))
        self.run.log(kind="train", epoch=rnd, step=rnd, loss=metrics["train_loss"], rows=n)
        return update, n, metrics

    def evaluate(
        self, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """The split trainer's evaluation of the global model on this client's test share."""
        n, metrics = self.trainer.evaluate(state, config)
        rnd = int(config.get("server-round", 1))
        scores = {k: v for k, v in metrics.items() if k != "confusion"}  # the server sums those
        record = {"epoch": rnd, "step": rnd, **scores, "examples": n}
        self.history.append(record)
        self.run.log(kind="eval", **record)
        return n, metrics

    def finish(self) -> dict[str, float | int]:
        """Write the client's run folder and end the session (once); returns the report the
        server lists: client, steps, wire bytes."""
        with self._lock:
            t = self.trainer
            sent, received = t.link.counters()
            report = {
                "client": self.client,
                "steps": t.steps,
                "wire_bytes_sent": sent,
                "wire_bytes_received": received,
            }
            if self.done.is_set():
                return report
            if t.front_adapter is not None:  # the global delta it evaluated last: its own copy
                model = self.cfg.model.name
                t.front_adapter.save(self.run.path / "front_adapter", base_model=model)
            t.close()
            final = self.history[-1] if self.history else {}
            self.run.finish(
                {
                    "mode": "split",
                    "role": "client",
                    **report,
                    "clients": self.cfg.split.clients,
                    "server_adapter": self.cfg.split.server_adapter,
                    "server": self.relay,
                    "tls": self.tls,
                    "tee": SIMULATED_TEE if t.server_info.get("simulated") else "hardware",
                    "enclave_measurement": str(t.server_info.get("measurement")),
                    "front_method": t.front_adapter.method if t.front_adapter else None,
                    "client_trainable_params": t.trainable_params,
                    "server_trainable_params": t.server_info["trainable_params"],
                    "wire_bytes_per_step": round((sent + received) / max(t.steps, 1)),
                    **{k: v for k, v in final.items() if k not in ("epoch", "step")},
                    "rounds": len(self.history),
                    "history": self.history,
                }
            )
            self.done.set()
            return report

    def close(self) -> None:
        """Leave without finishing (interrupted): end the session; the folder stays partial."""
        with self._lock:
            if not self.done.is_set():
                self.trainer.close()
                self.run.abort()
