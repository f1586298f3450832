"""Run a Flower ``ServerApp`` and ``ClientApp`` on one machine, in this process, without Ray.

Flower's own simulation runtime (``flwr.simulation.run_simulation``, ``flwr run`` on a local
federation) needs the ``ray`` extra. :class:`LocalGrid` implements Flower's ``Grid`` interface
instead: each pushed message is handed to the ``ClientApp`` of its node (one ``Context`` per
node, ``partition-id`` / ``num-partitions`` in its node config, as in Flower's simulation), in a
small thread pool; an exception becomes an error reply (Flower's
``CLIENT_APP_RAISED_EXCEPTION``), and a reply that misses the strategy's timeout is dropped, as a
SuperLink drops a node that does not answer. Everything else (rounds, sampling, strategies,
records, mods) is Flower's.
"""

from __future__ import annotations

import copy
import secrets
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from shieldtune.federated.codec import message_nbytes

__all__ = ["LocalGrid", "Traffic", "run_simulation"]


@dataclass(frozen=True)
class Traffic:
    """One message on the simulated wire.

    Attributes:
        node: The client node.
        direction: ``"to_client"`` or ``"to_server"``.
        message_type: Flower message type (``train``, ``evaluate``, ``query.*``).
        nbytes: Payload bytes (arrays, metrics, configs).
    """

    node: int
    direction: str
    message_type: str
    nbytes: int


class LocalGrid(Grid):
    """A Flower ``Grid`` whose nodes are ``ClientApp`` calls in this process.

    Args:
        client_app: The Flower ``ClientApp`` every node runs.
        num_nodes: Number of client nodes.
        node_configs: Per-node config (default: ``partition-id`` and ``num-partitions``).
        workers: Messages handled concurrently (1: one after another, deterministic).
        tap: Called with every message that crosses the simulated wire (tests, audits).
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        node_configs: list[dict[str, int | float | str | bool]] | None = None,
        *,
        workers: int = 1,
        tap: Callable[[Message], None] | None = None,
    ) -> None:
        run_id = secrets.randbits(63)
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 1
        self._run = Run.create_empty(run_id)
        self.client_app = client_app
        configs = node_configs or [
            {"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)
        ]
        self.contexts = {
            1000 + i: Context(
                run_id=run_id,
                node_id=1000 + i,
                node_config=dict(cfg),
                state=RecordDict(),
                run_config={},
            )
            for i, cfg in enumerate(configs)
        }
        self.traffic: list[Traffic] = []
        self.tap = tap
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clientapp")
        self._pending: dict[str, Future[Message]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ Grid interface
    def set_run(self, run: Run) -> None:
        """Set the run this grid operates in."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A new instruction message (prefer the ``Message`` constructor)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Ids of the client nodes."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Hand each message to its node's ``ClientApp``; return the message ids."""
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no node {msg.metadata.dst_node_id} in this grid")
            msg_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id
            self._record(msg, msg.metadata.dst_node_id, "to_client")
            delivered = copy.deepcopy(msg)  # nothing is shared with the server's objects
            with self._lock:
                self._pending[msg_id] = self._pool.submit(self._handle, delivered)
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies that are ready for the given message ids."""
        out = []
        with self._lock:
            for msg_id in message_ids:
                fut = self._pending.get(msg_id)
                if fut is not None and fut.done():
                    del self._pending[msg_id]
                    out.append(fut.result())
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then wait up to ``timeout`` seconds; late replies are dropped."""
        ids = list(self.push_messages(messages))
        with self._lock:
            futures = [self._pending[i] for i in ids]
        wait(futures, timeout=timeout)
        replies = list(self.pull_messages(ids))
        with self._lock:
            for msg_id in ids:  # abandon the rest, as a SuperLink drops a silent node
                fut = self._pending.pop(msg_id, None)
                if fut is not None:
                    fut.cancel()
        return replies

    # ------------------------------------------------------------------ internals
    def _handle(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        try:
            reply = self.client_app(msg, self.contexts[node])
        except Exception as ex:  # noqa: BLE001  (reported to the server, as Flower does)
            reason = f"{type(ex).__name__}: {ex}"
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        self._record(reply, node, "to_server")
        return copy.deepcopy(reply)

    def _record(self, msg: Message, node: int, direction: str) -> None:
        self.traffic.append(
            Traffic(node, direction, msg.metadata.message_type, message_nbytes(msg))
        )
        if self.tap is not None:
            self.tap(msg)

    def shutdown(self) -> None:
        """Stop the worker threads (waits for running client calls)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def run_simulation(
    server_app: ServerApp,
    client_app: ClientApp,
    num_nodes: int,
    *,
    node_configs: list[dict[str, int | float | str | bool]] | None = None,
    run_config: Mapping[str, int | float | str | bool] | None = None,
    workers: int = 1,
    tap: Callable[[Message], None] | None = None,
) -> LocalGrid:
    """Run ``server_app`` against ``num_nodes`` in-process ``client_app`` nodes, to completion.

    Returns:
        The grid (its ``traffic`` lists every message and its size).
    """
    grid = LocalGrid(client_app, num_nodes, node_configs, workers=workers, tap=tap)
    context = Context(
        run_id=grid.run.run_id,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )
    try:
        server_app(grid, context)
    finally:
        grid.shutdown()
    return grid
