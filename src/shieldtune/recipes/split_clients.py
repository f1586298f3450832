"""One split client as a Flower trainer: the front slice (+ SPF) here, the back on the server.

:class:`SplitTrainer` implements the federated :class:`~shieldtune.federated.client_app.Trainer`
protocol, so the ClientApp, its mods and the partitioning are the federated modes' own. Per
round::

    fit(global Δ):  front := base + Δ;  local_epochs of split steps on the client's share
                    (its own session with the split server);  commit the last server step;
                    reply with the whole front delta (sparse state) and the rows trained on
    evaluate(Δ):    front := base + Δ;  logits of the test share through the same path

The *whole* delta (difference from the base front, the global's entries off this client's SPF
mask included) is what the aggregation averages: FedAvg of the front weights in sparse form.
Without a front adapter the reply carries no tensors. The trainer does not know whether its
session ends in an enclave (``split``) or in this process (``plain-split``): ``connect``
decides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from shieldtune.adapters.spf import SPFAdapter
from shieldtune.data.tasks import batches
from shieldtune.errors import IntegrityError
from shieldtune.federated.aggregate import sparse_from_state, sparse_state
from shieldtune.federated.client_app import LocalTraining, shuffle_seed
from shieldtune.models import load_model, slice_model
from shieldtune.split.client import SplitClient, SplitRemote, attach_front_adapter
from shieldtune.training import evaluate, make_optim
from shieldtune.training.rng import CLIENT_STREAM, GLOBAL_RNG_LOCK, RngStream

__all__ = ["Link", "SplitSettings", "SplitTrainer"]


@dataclass
class Link:
    """A client's session with the split server.

    Attributes:
        remote: The server stub.
        close: Ends the session.
        counters: ``() -> (bytes sent, bytes received)`` on the wire ((0, 0) in process).
    """

    remote: SplitRemote
    close: Callable[[], None]
    counters: Callable[[], tuple[int, int]] = lambda: (0, 0)


@dataclass(frozen=True)
class SplitSettings:
    """What a split client needs beyond the federated :class:`LocalTraining`."""

    cut: int
    front_adapter: dict[str, Any] | None
    front_lr: float
    total_steps: int  # this client's steps over all rounds (front learning-rate schedule)


class SplitTrainer:
    """A split client: its model copy (front slice used), its session, its shares.

    Args:
        settings: Local training settings (model, task, local epochs, batch sizes, lr, seed).
        split: Cut, front adapter, front learning rate, planned steps.
        train: The client's encoded training share.
        test: The client's encoded share of the held-out test split.
        partition: The client's partition id.
        connect: Opens the client's session with the split server.
        log: Receives one record per step (``client``, ``round``, ``step``, ``loss``).
    """

    def __init__(
        self,
        settings: LocalTraining,
        split: SplitSettings,
        train: dict[str, torch.Tensor],
        test: dict[str, torch.Tensor],
        partition: int,
        connect: Callable[[], Link],
        log: Callable[..., None] | None = None,
    ) -> None:
        self.s, self.train, self.test, self.partition = settings, train, test, partition
        self.log = log or (lambda **record: None)
        with GLOBAL_RNG_LOCK:  # other clients may be training in this process
            loaded = load_model(
                settings.model, settings.task, settings.num_labels, seed=settings.seed
            )
        front, _ = slice_model(loaded.model, split.cut)
        for p in front.parameters():
            p.requires_grad_(False)
        self.link = connect()
        try:
            self.client, self.front_adapter = self._attach(split, loaded.model, front)
        except BaseException:
            self.link.close()  # a client that cannot start leaves no session behind
            raise
        self.steps = 0  # split steps over all rounds

    def _attach(
        self, split: SplitSettings, model: Any, front: Any
    ) -> tuple[SplitClient, SPFAdapter | None]:
        """Join the server, attach the front adapter (SPF warm-up through the server), build
        the split client."""
        settings, partition, train = self.s, self.partition, self.train
        self.server_info = self.link.remote.init()
        front_adapter: SPFAdapter | None = None
        optim = None
        if split.front_adapter is not None:
            seed = shuffle_seed(settings.seed, partition, 0)
            front_adapter = attach_front_adapter(  # type: ignore[assignment]
                front,
                model,
                split.front_adapter,
                self.link.remote,
                train,
                batch_size=settings.batch_size,
                seed=seed,
            )
            params = front_adapter.trainable_parameters()  # type: ignore[union-attr]
            optim = make_optim(params, split.front_lr, settings.train_cfg, split.total_steps)
        rng = RngStream(settings.seed + CLIENT_STREAM + 1000 * (partition + 1))
        client = SplitClient(
            front,
            self.link.remote,
            task=settings.task,
            precision=settings.precision,
            rng=rng,
            optim=optim,
        )
        self.trainable_params = optim.num_params() if optim is not None else 0
        return client, front_adapter

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        """front := base + the global delta (an empty state keeps the current front)."""
        if not state:
            return
        if self.front_adapter is None:
            raise IntegrityError("a global front delta arrived, but this client has no front SPF")
        self.front_adapter.load_global(sparse_from_state(state))  # type: ignore[arg-type]

    def fit(
        self, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
        """Local epochs of split steps from the global front delta; returns the whole delta."""
        self._load(state)
        rnd = int(config.get("server-round", 1))
        seed = shuffle_seed(self.s.seed, self.partition, rnd)
        losses: list[float] = []
        for epoch in range(self.s.epochs):
            for batch in batches(
                self.train, self.s.batch_size, shuffle=True, seed=seed, epoch=epoch
            ):
                losses.append(self.client.train_step(batch))
                self.log(client=self.partition, round=rnd, step=len(losses), loss=losses[-1])
        self.client.finish()  # the last server step is applied before the round is averaged
        self.steps += len(losses)
        update = (
            {} if self.front_adapter is None else sparse_state(self.front_adapter.whole_delta())
        )
        n = int(self.train["labels"].shape[0])
        return update, n, {"train_loss": sum(losses) / max(len(losses), 1)}

    def evaluate(
        self, state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        """Metrics of the global model (front: base + Δ; back: the server's) on the test share."""
        self._load(state)
        s = self.s
        metrics = evaluate(
            self.client.logits,
            self.test,
            s.task,
            s.eval_batch_size,
            s.num_labels,
            confusion=s.eval_confusion,
        )
        return int(self.test["labels"].shape[0]), metrics

    def close(self) -> None:
        """End the session with the split server (once)."""
        close, self.link.close = self.link.close, lambda: None
        close()
