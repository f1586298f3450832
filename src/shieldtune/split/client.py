"""The split client: the front slice (+ SPF) here, the back slice behind an attested channel.

    client:  h = front(x)                                   (B, T, d)  -> sealed, sent
    enclave: loss, g = ∂loss/∂h  (back-slice update staged)            <- sealed, returned
    client:  h.backward(g); front step; commit the server's step with the next request

:class:`SplitRemote` is the typed stub of the ``split-server`` ECALLs over any ``call(name, meta,
tensors)`` (a :class:`~shieldtune.tee.client.SecureClient`); :class:`SplitClient` runs the
client's half of plain-split's step through it, under the client's own random stream, so the
two modes compute the same thing. :class:`RemoteLoss` makes the server's ``grad_only`` a
differentiable function of the hidden states, which the SPF ``gradient`` saliency rule needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from shieldtune.adapters import ADAPTERS, Adapter, parse_config
from shieldtune.crypto.framing import Frame, MetaValue
from shieldtune.data.tasks import batches
from shieldtune.errors import ChannelError
from shieldtune.models import ModelSlice
from shieldtune.split.protocol import COMMIT_KEY, to_wire
from shieldtune.split.step import client_backward, client_forward
from shieldtune.training.rng import RngStream
from shieldtune.training.steps import Optim, autocast

__all__ = ["SplitRemote", "RemoteLoss", "SplitClient", "attach_front_adapter"]

Call = Callable[[str, Mapping[str, MetaValue] | None, Mapping[str, torch.Tensor] | None], Frame]


class SplitRemote:
    """The server enclave's ECALLs, as the client calls them over the attested channel.

    Carries the two-phase step protocol: the token of the last staged server step is sent as
    ``commit`` with the next request (see :mod:`shieldtune.split.protocol`).

    Args:
        call: ``call(ecall, meta, tensors) -> Frame``, e.g. ``SecureClient.call``.
        wire_dtype: ``float32`` or ``bfloat16`` for hidden states and gradients.
    """

    def __init__(self, call: Call, wire_dtype: str = "float32") -> None:
        self._call = call
        self.wire_dtype = wire_dtype
        self.pending: str | None = None  # token of the staged, uncommitted server step

    def _request(self, ecall: str, tensors: Mapping[str, torch.Tensor] | None = None) -> Frame:
        meta: dict[str, MetaValue] = {}
        if self.pending is not None:
            meta[COMMIT_KEY] = self.pending
        reply = self._call(ecall, meta, tensors)
        self.pending = None  # committed with this (accepted) request
        return reply

    def _batch(
        self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        tensors = {"hidden": to_wire(hidden, self.wire_dtype), "attention_mask": mask.long()}
        if labels is not None:
            tensors["labels"] = labels.long()
        return tensors

    def init(self) -> dict[str, MetaValue]:
        """Build (or join) the server state; returns what the enclave reports."""
        return dict(self._request("init").meta)

    def train_step(
        self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[float, torch.Tensor]:
        """Send (B, T, d) hidden states; get the loss and ∂loss/∂hidden; stage the server step."""
        reply = self._request("train_step", self._batch(hidden, mask, labels))
        self.pending = str(reply.meta["token"])
        return float(reply.meta["loss"]), reply.tensors["grad"]  # type: ignore[arg-type]

    def commit(self) -> int:
        """Apply the staged server step now; returns the server's step count."""
        return int(self._request("commit").meta["steps"])  # type: ignore[arg-type]

    def grad_only(
        self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[float, torch.Tensor]:
        """Loss and ∂loss/∂hidden in eval mode; the server changes nothing."""
        reply = self._request("grad_only", self._batch(hidden, mask, labels))
        return float(reply.meta["loss"]), reply.tensors["grad"]  # type: ignore[arg-type]

    def eval_step(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) or (B, T, V) of the back slice in eval mode."""
        return self._request("eval_step", self._batch(hidden, mask, None)).tensors["logits"]

    def export_adapter(self) -> dict[str, torch.Tensor]:
        """The server adapter's tensors (if the enclave's measured config allows export)."""
        return dict(self._request("export_adapter").tensors)

    def checkpoint(self) -> int:
        """Stage the server state for sealing by the host; returns the server's step count."""
        return int(self._request("checkpoint").meta["steps"])  # type: ignore[arg-type]


class RemoteLoss(torch.autograd.Function):
    """``loss = L(back(h), y)`` computed by the enclave; backward returns its ∂loss/∂h."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        labels: torch.Tensor,
        remote: SplitRemote,
    ) -> torch.Tensor:
        loss, grad = remote.grad_only(hidden, mask, labels)  # (), (B, T, d)
        ctx.save_for_backward(grad.to(hidden.dtype))
        return hidden.new_tensor(loss)  # ()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors  # (B, T, d)
        return grad * grad_out, None, None, None


def attach_front_adapter(
    front: ModelSlice,
    model: nn.Module,
    spec: dict[str, Any],
    remote: SplitRemote,
    train: dict[str, torch.Tensor],
    *,
    batch_size: int,
    seed: int,
) -> Adapter:
    """Attach the client's front adapter (e.g. SPF) as plain-split does, through the registry.

    SPF's ``gradient`` rule scores warm-up batches whose loss the enclave computes; the front
    runs in eval mode, so the warm-up draws no random numbers.

    Args:
        front: The client's front slice (frozen; the adapter enables its own parameters).
        model: The model the slice was cut from.
        spec: ``{method, **options}`` (``split.front_adapter``).
        remote: The server stub (for the gradient warm-up).
        train: Encoded training split (warm-up batches, shuffled as plain-split shuffles them).
        batch_size: Rows per warm-up batch.
        seed: Shuffle seed.
    """
    options = dict(spec)
    entry = ADAPTERS.get(str(options.pop("method", None)), field="split.front_adapter.method")
    settings = parse_config(entry.config_cls, options, "split.front_adapter")
    extra: dict[str, Any] = {}
    if entry.name == "spf":
        warm: list[dict[str, torch.Tensor]] = []

        def warmup_loss(i: int) -> torch.Tensor:
            if not warm:  # the batches plain-split's warm-up sees, in the same order
                warm.extend(batches(train, batch_size, shuffle=True, seed=seed, epoch=-1))
            front.eval()
            batch = warm[i % len(warm)]
            hidden = front(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            return RemoteLoss.apply(hidden, batch["attention_mask"], batch["labels"], remote)

        extra["loss_fn"] = warmup_loss
    return entry.attach(front, model, settings, **extra)


class SplitClient:
    """The client half of split fine-tuning.

    Args:
        front: The front slice (embeddings + layers 1..k).
        remote: The server stub.
        task: ``seq-cls`` or ``causal-lm``.
        precision: ``float32`` or ``bfloat16`` autocast.
        rng: The client's random stream (dropout of the front slice).
        optim: Optimiser of the front adapter, or None when the front is frozen.
    """

    def __init__(
        self,
        front: ModelSlice,
        remote: SplitRemote,
        *,
        task: str,
        precision: str,
        rng: RngStream,
        optim: Optim | None = None,
    ) -> None:
        self.front, self.remote = front, remote
        self.task, self.precision = task, precision
        self.rng, self.optim = rng, optim

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        """One split step; returns the loss. The server's half commits with the next request."""
        self.front.train()
        with self.rng.active():
            hidden = client_forward(self.front, batch, self.precision)  # (B, T, d)
        loss, grad = self.remote.train_step(
            hidden, batch["attention_mask"], batch["labels"]
        )  # (), (B, T, d) from the enclave
        if self.optim is not None:
            client_backward(hidden, grad)  # front-slice grads
            self.optim.step()
        return loss

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Evaluation forward through the same path: (B, C) or (B, T, V) logits."""
        self.front.eval()
        with autocast(self.precision):
            hidden = self.front(
                batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
            )  # (B, T, d)
        return self.remote.eval_step(hidden, batch["attention_mask"])

    def finish(self) -> int:
        """Commit the last staged server step; returns the server's step count."""
        steps = self.remote.commit()
        if self.remote.pending is not None:
            raise ChannelError("the last server step could not be committed")
        return steps
