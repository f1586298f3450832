"""The protection wrapper of Method 1: frozen linear maps whose product runs somewhere else.

:func:`offload_linears` swaps every frozen ``nn.Linear`` (and GPT-2 ``Conv1D``) of a model for an
:class:`OffloadedLinear` that keeps only the bias and asks an :class:`Offload` for the product.
Everything else (embeddings, norms, attention scores and values, activations, the adapters, the
head, the loss) stays where the model is: inside the enclave. Without the wrapper the model is
the plain baseline, so a comparison compares the protection only.

    y = x · Wᵀ + b        forward:  y = offload.forward(i, x) + b        (x: (n, in) -> (n, out))
    ∂x = ∂y · W           backward: ∂x = offload.backward(i, ∂y)         (only if x needs a grad)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from shieldtune.errors import ModelError

__all__ = ["Offload", "FrozenLinear", "OffloadedLinear", "frozen_linears", "offload_linears"]


class Offload(Protocol):
    """Computes frozen products of layer ``i``: ``x · W_iᵀ`` and ``g · W_i`` (floats)."""

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """(n, in) -> (n, out)."""
        ...

    def backward(self, layer: int, g: torch.Tensor) -> torch.Tensor:
        """(n, out) -> (n, in)."""
        ...


@dataclass(frozen=True)
class FrozenLinear:
    """One frozen linear map of a model, as the offload sees it.

    Attributes:
        name: Module path with PEFT's ``.base_layer`` removed (the same on every party).
        weight: (out, in) float weight (a ``Conv1D``'s weight is transposed to this layout).
        bias: (out,) or None.
    """

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return None
    return Conv1D


def _as_frozen(name: str, module: nn.Module) -> FrozenLinear | None:
    conv1d = _conv1d_type()
    if isinstance(module, nn.Linear):
        weight = module.weight  # (out, in)
    elif conv1d is not None and isinstance(module, conv1d):
        weight = module.weight.t()  # Conv1D keeps (in, out)
    else:
        return None
    if weight.requires_grad:
        return None
    bias = module.bias
    if bias is not None and bias.requires_grad:
        return None
    return FrozenLinear(name.replace(".base_layer", ""), weight.detach(), bias)


def _found(model: nn.Module, root: nn.Module | None) -> list[tuple[str, FrozenLinear]]:
    """(path in ``model``, map named by its path in ``root``) for every frozen map of ``model``."""
    names = {id(m): n for n, m in (root or model).named_modules()}
    out = []
    for path, module in model.named_modules():
        found = _as_frozen(names.get(id(module), path), module)
        if found is not None:
            out.append((path, found))
    return out


def frozen_linears(model: nn.Module, root: nn.Module | None = None) -> list[FrozenLinear]:
    """Every frozen linear map of ``model``, in module order.

    A linear whose weight or bias trains (an adapter matrix, a trained head) is not frozen and is
    not listed: it stays in the enclave.

    Args:
        model: The model (or a slice of it) to search.
        root: Name the maps by their path in this module (the Hugging Face model, so the name
            is the same on every party whatever wrapper holds it); default ``model``.
    """
    return [f for _, f in _found(model, root)]


class _OffloadedProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: OffloadedLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.module = module
        lead = x.shape[:-1]
        y = module.offload.forward(module.index, x.reshape(-1, module.in_features))  # (n, out)
        return y.to(x.dtype).reshape(*lead, module.out_features)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None  # nothing below trains: no product, no mask spent
        module: OffloadedLinear = ctx.module
        lead = grad.shape[:-1]
        gx = module.offload.backward(module.index, grad.reshape(-1, module.out_features))
        return gx.to(grad.dtype).reshape(*lead, module.in_features), None


class OffloadedLinear(nn.Module):
    """A frozen linear map whose product is computed by an :class:`Offload`.

    Args:
        index: Position of the map in :func:`frozen_linears` order (the offload's layer id).
        name: The map's name (see :class:`FrozenLinear`).
        in_features: Input width.
        out_features: Output width.
        bias: The frozen bias, kept here (or None).
        offload: Who computes the products.
    """

    def __init__(
        self,
        index: int,
        name: str,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None,
        offload: Offload,
    ) -> None:
        super().__init__()
        self.index, self.name = index, name
        self.in_features, self.out_features = in_features, out_features
        self.offload = offload
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _OffloadedProduct.apply(x, self)  # (..., out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.name!r}, in={self.in_features}, out={self.out_features}, offloaded"


def offload_linears(
    model: nn.Module, offload: Offload, root: nn.Module | None = None
) -> list[FrozenLinear]:
    """Replace every frozen linear map of ``model`` by an :class:`OffloadedLinear`, in place.

    The replaced weights are no longer referenced by the model (only the returned list holds
    them, for the caller to quantise and then drop). ``root`` names the maps as in
    :func:`frozen_linears`.

    Returns:
        The replaced maps, in the order of their layer ids.

    Raises:
        ModelError: The model has no frozen linear map (nothing to offload).
    """
    found = _found(model, root)
    if not found:
        raise ModelError("the model has no frozen linear map to offload")
    for index, (path, frozen) in enumerate(found):
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        out_f, in_f = frozen.weight.shape
        setattr(
            parent, attr, OffloadedLinear(index, frozen.name, in_f, out_f, frozen.bias, offload)
        )
    return [f for _, f in found]
