"""The split step, cut where the parties meet. Plain-split calls the three in one process;
the secure split mode runs ``server_step`` inside the server enclave and moves ``hidden`` and
``grad`` over the attested channel. Nothing else differs.

    client:  h = front(x)                                  (B, T, d)      -> sent
    server:  loss = L(back(h), y);  g = ∂loss/∂h           (B, T, d)      <- returned
    client:  h.backward(g)
"""

from __future__ import annotations

import torch
from torch import nn

from shieldtune.training.losses import task_loss
from shieldtune.training.steps import autocast

__all__ = ["client_forward", "server_step", "client_backward"]


def client_forward(
    front: nn.Module, batch: dict[str, torch.Tensor], precision: str
) -> torch.Tensor:
    """Client: token ids -> cut-layer hidden states (B, T, d), graph kept for the backward."""
    with autocast(precision):
        return front(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))


def server_step(
    back: nn.Module,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    task: str,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Server: loss and ∂loss/∂hidden; the back slice's own gradients are left in place.

    Args:
        back: The back slice (layers k+1..L + head) with its adapter.
        hidden: (B, T, d) received cut-layer hidden states (no graph).
        attention_mask: (B, T) padding mask.
        labels: (B,) class ids or (B, T) token labels.
        task: ``seq-cls`` or ``causal-lm``.
        precision: ``float32`` or ``bfloat16`` autocast.

    Returns:
        ``(loss, grad)``: the scalar loss and the (B, T, d) gradient to return to the client.
    """
    received = hidden.detach().float().requires_grad_(True)  # (B, T, d)
    with autocast(precision):
        logits = back(received, attention_mask)  # (B, C) or (B, T, V)
    loss = task_loss(logits, labels, task)  # ()
    loss.backward()  # back-slice adapter grads + received.grad
    return loss.detach(), received.grad  # (), (B, T, d)


def client_backward(hidden: torch.Tensor, grad: torch.Tensor) -> None:
    """Client: continue the backward pass from the returned gradient (B, T, d)."""
    hidden.backward(grad.to(hidden.dtype))
