"""The attacker's copy of a federated client, for attacks on its visible update.

The FedAvg host knows the public model, the adapter code and settings, the seed and the global
adapter it sent (it is the server). So it can build the client's model exactly as the client
does (:class:`~shieldtune.federated.client_app.AdapterTrainer`, the client's own code), load any
adapter state into it (the global one, or the update it sees) and compute losses and gradients
of candidate examples it holds.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from shieldtune.federated.client_app import AdapterTrainer, LocalTraining
from shieldtune.training import task_loss
from shieldtune.training.losses import IGNORE_INDEX

__all__ = ["Shadow"]


class Shadow:
    """A client model under the attacker's control.

    Args:
        settings: The client's local-training settings (model, adapter, seed: all public).
    """

    def __init__(self, settings: LocalTraining) -> None:
        self.settings = settings
        self.client = AdapterTrainer(settings, {}, {}, partition=0)
        self.params = self.client.adapter.trainable_parameters()

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The seeded adapter every client starts from (round 1's global adapter)."""
        return self.client.state()

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load an adapter state (global, or a viewed update) into the shadow model."""
        self.client.load(dict(state))

    def flat_params(self) -> torch.Tensor:
        """(P,) float64: the trainable parameters of the loaded state, concatenated."""
        return torch.cat([p.detach().flatten() for p in self.params]).double()

    def _loss(self, batch: dict[str, torch.Tensor], row: int) -> torch.Tensor:
        one = {k: v[row : row + 1] for k, v in batch.items()}
        logits = self.client.whole(
            one["input_ids"], one["attention_mask"], one.get("token_type_ids")
        )  # (1, C) or (1, T, V)
        return task_loss(logits, one["labels"], self.settings.task)  # ()

    @torch.no_grad()
    def losses(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) float64 per-example task losses of the loaded state, in eval mode.

        Row i's value is ``task_loss`` of row i alone (mean over its answer tokens for a causal
        LM), computed for all rows in one forward pass.
        """
        self.client.whole.eval()
        logits = self.client.whole(
            batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
        ).double()  # (N, C) or (N, T, V)
        labels = batch["labels"]
        if self.settings.task == "seq-cls":
            return F.cross_entropy(logits, labels, reduction="none")  # (N,)
        targets = labels[:, 1:]  # (N, T-1), token t+1 predicted at t
        per_token = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )  # (N, T-1)
        counted = (targets != IGNORE_INDEX).sum(dim=1)  # (N,)
        return per_token.sum(dim=1) / counted  # (N,)

    def gradients(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, P) float64 per-example gradients of the loss w.r.t. the trainable parameters."""
        self.client.whole.eval()
        rows = []
        for i in range(batch["input_ids"].shape[0]):
            grads = torch.autograd.grad(self._loss(batch, i), self.params, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).flatten()
                        for g, p in zip(grads, self.params, strict=True)
                    ]
                ).double()
            )
        return torch.stack(rows)  # (N, P)
