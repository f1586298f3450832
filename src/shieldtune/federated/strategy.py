"""``ValidatedFedAvg``: Flower's FedAvg with per-update validation and a ``min_clients`` quorum.

Flower's ``FedAvg`` averages whatever arrives (a NaN update poisons the global model; one reply
with other keys aborts the run). This subclass keeps Flower's sampling, messages and metric
aggregation, and replaces only the array aggregation: each update is screened on its own
(:func:`~shieldtune.federated.aggregate.screen_updates`: structure of the global adapter,
finite, size), refused ones are logged and dropped, and the accepted ones are averaged with
:func:`~shieldtune.federated.aggregate.fedavg` when at least ``min_clients`` remain; otherwise
the round keeps the previous global adapter.

Every round's outcome goes to ``on_event`` (the recipe writes it to ``metrics.jsonl``).

:class:`SparseFedAvg` is the same for sparse SPF deltas whose masks differ (split clients):
union-support averaging with the optional DP of
:func:`~shieldtune.federated.aggregate.sparse_fedavg`.

:class:`ResumedRounds` wraps any strategy so that Flower's round loop (which always counts from
1) runs the federation's rounds ``done + 1, done + 2, ...`` after a restart. :class:`AfterTrain`
wraps any strategy to run a hook once a round's training is aggregated (split's per-client
server adapters are averaged there).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from shieldtune.data.metrics import macro_f1_from_confusion
from shieldtune.federated.aggregate import Spec, fedavg, screen_updates, sparse_fedavg, spec_of
from shieldtune.federated.codec import from_array_record, to_array_record

__all__ = ["ValidatedFedAvg", "SparseFedAvg", "ResumedRounds", "AfterTrain", "Event"]

log = logging.getLogger("shieldtune.federated")
Event = Callable[[dict[str, Any]], None]
WEIGHT_KEY = "num-examples"


class ValidatedFedAvg(FedAvg):
    """FedAvg (weighted by ``num-examples``) that refuses bad updates one by one.

    Args:
        min_clients: Fewest accepted updates a round needs (also Flower's minimum of sampled
            and available nodes).
        fraction: Share of the nodes sampled for training and evaluation each round.
        max_update_bytes: Size limit of one update (None: no limit).
        on_event: Receives one dict per round outcome, refusal and dropped client.
    """

    def __init__(
        self,
        min_clients: int = 2,
        fraction: float = 1.0,
        max_update_bytes: int | None = None,
        on_event: Event | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction,
            fraction_evaluate=fraction,
            min_train_nodes=min_clients,
            min_evaluate_nodes=min_clients,
            min_available_nodes=min_clients,
            weighted_by_key=WEIGHT_KEY,
        )
        self.min_clients = min_clients
        self.max_update_bytes = max_update_bytes
        self.on_event = on_event or (lambda event: None)
        self.spec: Spec | None = None  # structure of the global adapter, once there is one
        self.sent: set[int] = set()  # nodes sent a message in the current step

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's sampling and messages (remembers who was asked)."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sent = {m.metadata.dst_node_id for m in messages}
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's sampling and messages (remembers who was asked)."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.sent = {m.metadata.dst_node_id for m in messages}
        return messages

    def emit(self, **event: Any) -> None:
        """Log an event and pass it to ``on_event``."""
        log.info("%s", event)
        self.on_event(event)

    def dropped(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies without error; report each failed or silent client (dropped this round)."""
        replies = list(replies)
        silent = self.sent - {m.metadata.src_node_id for m in replies}
        for node in sorted(silent):
            self.emit(kind="dropped", round=server_round, node=node, reason="no reply in time")
        self.sent = set()
        valid = []
        for msg in replies:
            if msg.has_error():
                self.emit(
                    kind="dropped",
                    round=server_round,
                    node=msg.metadata.src_node_id,
                    reason=str(msg.error.reason)[:300],
                )
            else:
                valid.append(msg)
        return valid

    def screened(
        self, server_round: int, replies: list[Message], *, sparse: bool = False
    ) -> tuple[list[Message], list[tuple[dict, float]], list[int]]:
        """``(valid replies, their (update, weight) pairs, accepted positions)``; each refused
        update is reported."""
        valid = self.dropped(server_round, replies)
        updates = []
        for msg in valid:
            try:
                state = from_array_record(msg.content["arrays"])
                weight = float(msg.content["metrics"][WEIGHT_KEY])  # type: ignore[arg-type]
            except (KeyError, TypeError, ValueError) as err:
                state, weight = {}, 0.0
                log.warning("malformed reply from %s: %s", msg.metadata.src_node_id, err)
            updates.append((state, weight))
        spec = None if sparse else self.spec
        accepted, refused = screen_updates(updates, spec, self.max_update_bytes, sparse=sparse)
        for i, reason in refused.items():
            node = valid[i].metadata.src_node_id
            self.emit(kind="refused", round=server_round, node=node, reason=reason)
        return valid, updates, accepted

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen each update, FedAvg the accepted ones (None when fewer than ``min_clients``)."""
        replies = list(replies)
        valid, updates, accepted = self.screened(server_round, replies)
        return self.finish_round(
            server_round,
            len(replies),
            len(accepted),
            lambda: self.to_arrays(fedavg([updates[i] for i in accepted])),
            [valid[i] for i in accepted],
        )

    def finish_round(
        self,
        server_round: int,
        answered: int,
        accepted: int,
        new_arrays: Callable[[], ArrayRecord],
        contributors: list[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Apply the quorum, build the new global arrays, aggregate train metrics, emit all."""
        if accepted < self.min_clients:
            self.emit(
                kind="round_failed",
                round=server_round,
                accepted=accepted,
                min_clients=self.min_clients,
                reason="fewer acceptable updates than min_clients; global adapter unchanged",
            )
            return None, None
        arrays = new_arrays()
        metrics = aggregate_metricrecords(
            [m.content for m in contributors if "metrics" in m.content], WEIGHT_KEY
        )
        self.emit(
            kind="aggregated",
            round=server_round,
            answered=answered,
            accepted=accepted,
            **{k: float(v) for k, v in metrics.items()},  # type: ignore[arg-type]
        )
        return arrays, metrics

    def to_arrays(self, state: Any) -> ArrayRecord:
        """The new global adapter as an ``ArrayRecord`` (and remember its structure)."""
        self.spec = spec_of(state)
        return to_array_record(state)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The global adapter's test metrics from the clients' disjoint test shares.

        Loss and accuracy are the sample-weighted means of the clients' (exact: both are means
        over rows). Macro-F1 is not a mean over rows: when every reply carries its share's
        confusion matrix (``"confusion"``, K² counts summing to its ``num-examples``), the
        matrices are summed and macro-F1 is scored on the whole test split; the weighted mean of
        the clients' macro-F1 is kept as ``macro_f1_client_mean``. Otherwise ``macro_f1`` is
        that weighted mean.
        """
        valid = self.dropped(server_round, replies)
        good = [m for m in valid if "metrics" in m.content and WEIGHT_KEY in m.content["metrics"]]
        if not good:
            return None
        metrics = aggregate_metricrecords([m.content for m in good], WEIGHT_KEY)
        total = sum(float(m.content["metrics"][WEIGHT_KEY]) for m in good)  # type: ignore[arg-type]
        if "confusion" in metrics:
            del metrics["confusion"]  # Flower averaged the counts; they are summed below
            summed = summed_confusion([m.content["metrics"] for m in good])
            if summed is not None and "macro_f1" in metrics:
                metrics["macro_f1_client_mean"] = metrics["macro_f1"]
                metrics["macro_f1"] = macro_f1_from_confusion(summed)
        self.emit(
            kind="eval",
            round=server_round,
            clients=len(good),
            examples=int(total),
            **{k: float(v) for k, v in metrics.items()},  # type: ignore[arg-type]
        )
        return metrics


def summed_confusion(records: list[MetricRecord]) -> list[list[int]] | None:
    """The K x K sum of the replies' flattened confusion matrices; None (and a warning) when a
    reply lacks one or it is malformed: not K² non-negative integers summing to the reply's
    ``num-examples``, or of another K than the first reply's."""
    flats = [record.get("confusion") for record in records]
    size = len(flats[0]) if flats and isinstance(flats[0], list) else 0
    k = math.isqrt(size)
    for flat, record in zip(flats, records, strict=True):
        if not (
            k > 0
            and k * k == size
            and isinstance(flat, list)
            and len(flat) == size
            and all(isinstance(v, int) and v >= 0 for v in flat)
            and sum(flat) == record.get(WEIGHT_KEY)
        ):
            log.warning("a reply's confusion matrix is missing or malformed; macro-F1 is the mean")
            return None
    total = [sum(column) for column in zip(*flats, strict=True)]  # (K·K,)
    return [total[i * k : (i + 1) * k] for i in range(k)]


class SparseFedAvg(ValidatedFedAvg):
    """:class:`ValidatedFedAvg` for sparse SPF deltas: union support, optional DP.

    Args:
        min_clients: Fewest accepted updates a round needs.
        fraction: Share of the nodes sampled per round.
        max_update_bytes: Size limit of one delta.
        on_event: Receives the round outcomes.
        dp_clip: C, the L2 bound of one client's update (None: no DP).
        dp_sigma: σ, the noise multiplier (noise from the OS CSPRNG).
    """

    def __init__(
        self,
        min_clients: int = 2,
        fraction: float = 1.0,
        max_update_bytes: int | None = None,
        on_event: Event | None = None,
        *,
        dp_clip: float | None = None,
        dp_sigma: float = 0.0,
    ) -> None:
        super().__init__(min_clients, fraction, max_update_bytes, on_event)
        self.dp_clip, self.dp_sigma = dp_clip, dp_sigma
        self.global_delta: dict[str, Any] = {}  # the last global delta (the DP reference)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen each delta, average the accepted ones on their union support."""
        replies = list(replies)
        valid, updates, accepted = self.screened(server_round, replies, sparse=True)

        def new_arrays() -> ArrayRecord:
            self.global_delta = sparse_fedavg(
                [updates[i] for i in accepted],
                self.global_delta,
                clip=self.dp_clip,
                sigma=self.dp_sigma,
                max_bytes=self.max_update_bytes,
            )
            return to_array_record(self.global_delta)

        contributors = [valid[i] for i in accepted]
        return self.finish_round(
            server_round, len(replies), len(accepted), new_arrays, contributors
        )


class _Wrapper(Strategy):
    """Passes every call on to ``inner``, with ``offset`` added to the round number."""

    def __init__(self, strategy: Strategy, offset: int = 0) -> None:
        self.inner = strategy
        self.offset = offset

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's messages for round ``offset + server_round``."""
        return self.inner.configure_train(self.offset + server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate round ``offset + server_round``."""
        return self.inner.aggregate_train(self.offset + server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation messages of round ``offset + server_round``."""
        return self.inner.configure_evaluate(self.offset + server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate the evaluation of round ``offset + server_round``."""
        return self.inner.aggregate_evaluate(self.offset + server_round, replies)


class AfterTrain(_Wrapper):
    """A strategy that runs ``hook(server_round)`` after each round's training is aggregated.

    What the hook returns (a dict, or None) is emitted as an ``after_train`` event through
    ``emit`` when given.

    Args:
        strategy: The strategy to run.
        hook: Called once per round, after ``aggregate_train`` (also when the round failed).
        emit: Event sink (e.g. the plain strategy's ``emit``).
    """

    def __init__(
        self,
        strategy: Strategy,
        hook: Callable[[int], dict[str, Any] | None],
        emit: Callable[..., None] | None = None,
    ) -> None:
        super().__init__(strategy)
        self.hook, self.emit = hook, emit

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregation, then the hook."""
        out = self.inner.aggregate_train(server_round, replies)
        info = self.hook(server_round)
        if info is not None and self.emit is not None:
            self.emit(kind="after_train", round=server_round, **info)
        return out


class ResumedRounds(_Wrapper):
    """A strategy whose round numbers start after ``done`` completed rounds.

    Flower's ``Strategy.start`` numbers its rounds 1..N; a federation resumed after ``done``
    rounds must send ``server-round = done + 1`` (clients seed their shuffling and dropout with
    it), log round ``done + 1`` and expect updates for it. Every call is passed on with the
    offset added.

    Args:
        strategy: The strategy to run (plain, or wrapped in the enclave aggregation).
        done: Rounds completed before this start.
    """

    def __init__(self, strategy: Strategy, done: int) -> None:
        super().__init__(strategy, done)
        self.done = done

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        log.info("resuming after round %d", self.done)
        self.inner.summary()
