"""``EnclaveAggregation``: a strategy wrapper that aggregates inside the server enclave.

It wraps :class:`~shieldtune.federated.strategy.ValidatedFedAvg` (the plain strategy: sampling,
quorum, events, metric aggregation) as Flower's DP wrappers wrap a strategy, and moves
everything that touches an adapter into the ``fedavg`` enclave program
(:mod:`~shieldtune.federated.enclave_program`). The host side (this object, the ServerApp, the
SuperLink) relays channel records it cannot read:

- before a node's first message (and after it failed) the wrapper runs the handshake through
  the Grid (``query.shieldtune_hello`` / ``query.shieldtune_connect``); a node whose
  verification or channel fails is refused for the round and logged;
- each node leaves a sealed ``fetch`` request with the host; the wrapper relays it into the
  enclave when it builds that node's next ``train`` / ``evaluate`` message, and sends the
  sealed reply (the current global adapter, encrypted for that node) with any earlier replies;
- sealed ``submit`` records of a train reply are relayed into the enclave at once; the enclave
  validates each update and keeps it; the wrapper then asks the enclave to ``aggregate``
  (a clear call with no tensors) and learns only counts and refusal reasons.

The host's ``arrays`` between rounds are a token (``global-round``), never the adapter.
With ``seal_path`` the enclave seals its state there after every aggregation (the platform's
monotonic counter advances each time), so a server that stops between rounds resumes from the
last completed round, and an older copy of the file is refused as a rollback.
Use it as ``EnclaveAggregation(ValidatedFedAvg(...), enclave)`` with clients that run
:class:`~shieldtune.federated.mods.SealedUpdateMod`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from shieldtune.errors import EnclaveError, ShieldtuneError
from shieldtune.federated.codec import pack_records, unpack_records
from shieldtune.federated.messages import CONNECT, HELLO
from shieldtune.federated.strategy import ValidatedFedAvg
from shieldtune.tee.enclave import Enclave

__all__ = ["EnclaveAggregation"]


@dataclass
class _Peer:
    session: int  # the enclave-side channel session
    fetch: bytes | None = None  # the node's sealed fetch request, relayed at its next message
    outbox: list[bytes] = field(default_factory=list)  # enclave replies not yet delivered


class EnclaveAggregation(Strategy):
    """Aggregation inside the server enclave around a plain :class:`ValidatedFedAvg`.

    Args:
        strategy: The plain strategy (sampling, quorum, events, metrics).
        enclave: A started enclave running the ``fedavg`` program (unsealed first, to resume).
        handshake_timeout_s: Seconds to wait for handshake replies.
        seal_path: Where the enclave seals its state after each aggregation (None: never).
    """

    def __init__(
        self,
        strategy: ValidatedFedAvg,
        enclave: Enclave,
        handshake_timeout_s: float = 600.0,
        seal_path: Path | None = None,
    ) -> None:
        self.inner = strategy
        self.enclave = enclave
        self.handshake_timeout_s = handshake_timeout_s
        self.seal_path = seal_path
        self.sealed: int | None = None  # the counter round of the last seal
        self.peers: dict[int, _Peer] = {}
        self.global_round = int(enclave.call("status").meta_int("round"))

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.inner.summary()

    # ------------------------------------------------------------------ peers
    def _drop(self, node: int, server_round: int, kind: str, reason: str) -> None:
        peer = self.peers.pop(node, None)
        if peer is not None:
            try:
                self.enclave.close_channel(peer.session)
            except ShieldtuneError:
                pass  # already closed by the enclave after a refused record
        if kind:
            self.inner.emit(kind=kind, round=server_round, node=node, reason=reason[:300])

    def _handshake(self, nodes: list[int], server_round: int, grid: Grid) -> None:
        hellos = [Message(RecordDict(), dst_node_id=n, message_type=HELLO) for n in nodes]
        opened: dict[int, int] = {}
        connects = []
        for reply in grid.send_and_receive(hellos, timeout=self.handshake_timeout_s):
            node = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise EnclaveError(str(reply.error.reason))
                hello = reply.content["handshake"]["hello"]
                session, server_hello = self.enclave.open_channel(bytes(hello))  # type: ignore[arg-type]
            except (ShieldtuneError, KeyError, TypeError) as err:
                self.inner.emit(
                    kind="refused_client", round=server_round, node=node, reason=str(err)
                )
                continue
            opened[node] = session
            content = RecordDict({"handshake": ConfigRecord({"server_hello": server_hello})})
            connects.append(Message(content, dst_node_id=node, message_type=CONNECT))
        answered = set()
        for reply in grid.send_and_receive(connects, timeout=self.handshake_timeout_s):
            node = reply.metadata.src_node_id
            answered.add(node)
            self.peers[node] = _Peer(opened[node])
            if reply.has_error():  # the client refused the enclave (attestation, channel)
                self._drop(node, server_round, "refused_client", str(reply.error.reason))
                continue
            try:
                *_, self.peers[node].fetch = unpack_records(reply.content["sealed"])
            except (ShieldtuneError, KeyError, ValueError) as err:
                self._drop(node, server_round, "refused_client", f"bad connect reply: {err}")
        for node in set(opened) - answered:
            self.peers[node] = _Peer(opened[node])
            self._drop(node, server_round, "dropped", "no answer to the handshake")

    def _sealed_messages(
        self, server_round: int, messages: Iterable[Message], config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        messages = list(messages)
        nodes = [m.metadata.dst_node_id for m in messages]
        new = [n for n in nodes if n not in self.peers or self.peers[n].fetch is None]
        for n in new:
            self._drop(n, server_round, "", "")  # forget a stale session, if any
        if new:
            self._handshake(new, server_round, grid)
        out = []
        for plain in messages:
            node = plain.metadata.dst_node_id
            peer = self.peers.get(node)
            if peer is None or peer.fetch is None:
                continue
            try:
                current = self.enclave.relay(peer.session, peer.fetch)
            except ShieldtuneError as err:
                self._drop(node, server_round, "refused_client", f"channel: {err}")
                continue
            records, peer.outbox, peer.fetch = [*peer.outbox, current], [], None
            content = RecordDict({"sealed": pack_records(records), "config": config})
            out.append(Message(content, dst_node_id=node, message_type=plain.metadata.message_type))
        self.inner.sent = {m.metadata.dst_node_id for m in out}  # refused nodes: reported
        return out

    def _silent(self, server_round: int, replies: list[Message]) -> None:
        """Drop the nodes that were sent a message and did not answer in time."""
        for node in sorted(self.inner.sent - {r.metadata.src_node_id for r in replies}):
            self._drop(node, server_round, "dropped", "no reply in time")
        self.inner.sent = set()

    def _take_records(self, server_round: int, reply: Message) -> bool:
        """Relay a reply's submit records into the enclave and keep its fetch; False if bad."""
        node = reply.metadata.src_node_id
        peer = self.peers.get(node)
        if peer is None:
            return False
        if reply.has_error():
            self._drop(node, server_round, "dropped", str(reply.error.reason))
            return False
        try:
            *uploads, fetch = unpack_records(reply.content["sealed"])
            for record in uploads:
                peer.outbox.append(self.enclave.relay(peer.session, record))
        except (ShieldtuneError, KeyError, ValueError) as err:
            self._drop(node, server_round, "refused_client", f"channel: {err}")
            return False
        peer.fetch = fetch
        return True

    # ------------------------------------------------------------------ Strategy
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The plain strategy's sampling; each message carries sealed records only."""
        plain = self.inner.configure_train(server_round, ArrayRecord(), config, grid)
        return self._sealed_messages(server_round, plain, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Relay the sealed updates, then aggregate inside the enclave."""
        replies = list(replies)
        self._silent(server_round, replies)
        good = [r for r in replies if self._take_records(server_round, r)]
        try:
            result = self.enclave.call("aggregate", {"round": self.global_round + 1})
        except EnclaveError as err:
            self.inner.emit(
                kind="round_failed", round=server_round, accepted=0, reason=str(err)[:300]
            )
            return None, None
        self.global_round = result.meta_int("round")
        if self.seal_path is not None:  # before anyone hears of the round (SealingError: abort)
            self.sealed = self.enclave.seal(self.seal_path)
        reasons = result.meta.get("reasons")
        for reason in reasons if isinstance(reasons, list) else []:
            self.inner.emit(kind="refused", round=server_round, reason=str(reason))
        accepted = result.meta_int("accepted")
        return self.inner.finish_round(server_round, len(replies), accepted, self.token, good)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As for training: sealed global adapter per node."""
        plain = self.inner.configure_evaluate(server_round, ArrayRecord(), config, grid)
        return self._sealed_messages(server_round, plain, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Keep each node's next fetch request; aggregate the metrics as the plain strategy."""
        replies = list(replies)
        self._silent(server_round, replies)
        for reply in replies:
            if not reply.has_error():
                self._take_records(server_round, reply)
        return self.inner.aggregate_evaluate(server_round, replies)

    def token(self) -> ArrayRecord:
        """What the host holds for the global adapter: its round number only."""
        return ArrayRecord({"global-round": Array(np.array([self.global_round], dtype=np.int64))})
