"""The Flower ``ClientApp``: local fine-tuning of the adapter, evaluation of the global adapter.

``build_client_app(trainer_for, mods)`` registers Flower ``train`` and ``evaluate`` functions
that call a :class:`Trainer` (one per node, built on first use by ``trainer_for(context)``).
plain-fedavg uses no mods; secure-fedavg adds
:class:`~shieldtune.federated.mods.SealedUpdateMod`, which turns sealed records into the plain
message these functions read and seals their replies: the functions are the same either way.

Message contents (plain): ``train`` in: ``arrays`` (global adapter; empty in round 1: start from
the shared seeded initialisation), ``config``; out: ``arrays`` (the update), ``metrics``
(``num-examples``, ``train_loss``). ``evaluate`` in: ``arrays``; out: ``metrics``
(``num-examples``, ``accuracy``, ``loss``, ...).

Models, adapters and data are imported when a :class:`AdapterTrainer` is built, not with this
module: in a Flower deployment every message runs in a fresh ClientApp process, and one that
only answers the handshake should not load transformers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.constant import ErrorCode

from shieldtune.federated.codec import from_array_record, to_array_record
from shieldtune.federated.messages import HANDSHAKE_ACTIONS

__all__ = [
    "Trainer",
    "LocalTraining",
    "AdapterTrainer",
    "build_client_app",
    "shuffle_seed",
    "HANDSHAKE_ACTIONS",
]


def shuffle_seed(seed: int, partition: int, server_round: int) -> int:
    """The seed a client shuffles its share with in a round (epoch-mixed by ``batches``)."""
    return seed + 7919 * partition + 104729 * server_round


class Trainer(Protocol):
    """What a federated client does with the global adapter."""

    def fit(
        self, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
        """Load ``state`` (if not empty), train locally; return (update, examples, metrics)."""
        ...

    def evaluate(
        self, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """Load ``state`` (if not empty) and evaluate; return (examples, metrics).

        Seq-cls metrics carry ``"confusion"`` (the flattened K x K counts) so that the server
        scores macro-F1 on the whole test split.
        """
        ...


@dataclass(frozen=True)
class LocalTraining:
    """Flat settings of one client's local training (built from the run config)."""

    model: str
    task: str
    num_labels: int | None
    method: str
    settings: Any
    epochs: int
    batch_size: int
    eval_batch_size: int
    lr: float
    train_cfg: Any
    seed: int
    precision: str = "float32"
    eval_confusion: bool = True  # evaluate() also returns the test share's confusion matrix


class AdapterTrainer:
    """One client: its copy of the model, the adapter, its train and test shares.

    Every client builds the model and adapter with the same seed, so all start from the same
    initial adapter (round 1 needs no global adapter from the server).

    Args:
        settings: Local training settings.
        train: The client's encoded training share.
        test: The client's encoded share of the held-out test split.
        partition: The client's partition id (mixes into shuffling seeds).
    """

    def __init__(
        self,
        settings: LocalTraining,
        train: dict[str, torch.Tensor],
        test: dict[str, torch.Tensor],
        partition: int,
    ) -> None:
        from shieldtune.adapters import ADAPTERS
        from shieldtune.adapters.base import head_parameters, hf_names
        from shieldtune.models import full_slice, load_model

        self.s = settings
        self.train, self.test, self.partition = train, test, partition
        torch.manual_seed(settings.seed)
        loaded = load_model(settings.model, settings.task, settings.num_labels, seed=settings.seed)
        self.model = loaded.model
        self.whole = full_slice(self.model)
        torch.manual_seed(settings.seed)
        self.adapter = ADAPTERS.get(settings.method).attach(
            self.whole, self.model, settings.settings
        )
        own = self.adapter.state_dict()
        names = hf_names(self.whole, self.model)
        # the classification head trains with every method; federate it too if the adapter's
        # state dict does not hold it already (SPF's holds only indices + values)
        self.extra = {
            names[id(p)]: p for p in head_parameters(self.whole) if names[id(p)] not in own
        }

    def state(self) -> dict[str, torch.Tensor]:
        """The federated tensors: the adapter's state dict plus the head if not in it."""
        out = self.adapter.state_dict()
        out.update({n: p.detach().clone() for n, p in self.extra.items()})
        return out

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Load the global adapter (an empty state keeps the current one)."""
        if not state:
            return
        self.adapter.load_state_dict({k: v for k, v in state.items() if k not in self.extra})
        with torch.no_grad():
            for name, p in self.extra.items():
                p.copy_(state[name])

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.whole(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))

    def fit(
        self, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
        """Local epochs of the same step the local recipe runs; a fresh optimizer per round."""
        from shieldtune.data.tasks import batches
        from shieldtune.training import autocast, make_optim, task_loss

        self.load(state)
        rnd = int(config.get("server-round", 1))
        n = int(self.train["labels"].shape[0])
        steps = self.s.epochs * -(-n // self.s.batch_size)
        optim = make_optim(self.adapter.trainable_parameters(), self.s.lr, self.s.train_cfg, steps)
        torch.manual_seed(self.s.seed + 1000 * rnd + self.partition)  # dropout, per client/round
        total, count = 0.0, 0
        self.whole.train()
        for epoch in range(self.s.epochs):
            seed = shuffle_seed(self.s.seed, self.partition, rnd)
            for batch in batches(
                self.train, self.s.batch_size, shuffle=True, seed=seed, epoch=epoch
            ):
                with autocast(self.s.precision):
                    logits = self._forward(batch)  # (B, C) or (B, T, V)
                loss = task_loss(logits, batch["labels"], self.s.task)
                loss.backward()
                optim.step()
                total, count = total + loss.item(), count + 1
        return self.state(), n, {"train_loss": total / max(count, 1)}

    def evaluate(
        self, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """Metrics of the global adapter on this client's test share."""
        from shieldtune.training import autocast, evaluate

        self.load(state)
        self.whole.eval()
        with autocast(self.s.precision):
            metrics = evaluate(
                self._forward,
                self.test,
                self.s.task,
                self.s.eval_batch_size,
                self.s.num_labels,
                confusion=self.s.eval_confusion,
            )
        return int(self.test["labels"].shape[0]), metrics

    def save(self, out_dir: Path) -> None:
        """Write the adapter this client holds (the global one after an evaluate round)."""
        self.adapter.save(out_dir, base_model=self.s.model)


def build_client_app(
    trainer_for: Callable[[Context], Trainer], mods: Sequence[Mod] = ()
) -> ClientApp:
    """A Flower ``ClientApp`` running one :class:`Trainer` per node.

    Args:
        trainer_for: Builds a node's trainer from its Flower context (called once per node).
        mods: Flower client mods wrapped around train and evaluate (e.g. ``SealedUpdateMod``).
    """
    app = ClientApp(mods=list(mods))
    trainers: dict[int, Trainer] = {}
    lock = threading.Lock()

    def trainer(context: Context) -> Trainer:
        with lock:
            if context.node_id not in trainers:
                trainers[context.node_id] = trainer_for(context)
            return trainers[context.node_id]

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        update, n, metrics = trainer(context).fit(
            from_array_record(msg.content["arrays"]), dict(msg.content["config"])
        )
        content = RecordDict(
            {
                "arrays": to_array_record(update),
                "metrics": MetricRecord({"num-examples": n, **metrics}),
            }
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        config = dict(msg.content["config"]) if "config" in msg.content else {}
        n, metrics = trainer(context).evaluate(from_array_record(msg.content["arrays"]), config)
        return Message(
            RecordDict({"metrics": MetricRecord({"num-examples": n, **metrics})}), reply_to=msg
        )

    for action in HANDSHAKE_ACTIONS:  # answered by SealedUpdateMod; refused without it

        @app.query(action)
        def no_handshake(msg: Message, context: Context) -> Message:
            reason = "this client runs plain-fedavg: it has no sealed-update mod"
            return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, reason), reply_to=msg)

    app.trainers = trainers  # type: ignore[attr-defined]  (the recipe saves client 0's adapter)
    return app
