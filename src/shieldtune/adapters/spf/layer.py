"""The SPF sparse-delta parametrization: W = W0 + scatter(indices, values).

``W0`` (the module's original weight) is frozen; ``spf_values`` (shape ``(nnz,)``) is the only
trainable tensor; ``spf_indices`` (shape ``(nnz,)``, int64, sorted, unique) are flat row-major
positions into ``W0``. The parametrization is registered with
:func:`torch.nn.utils.parametrize.register_parametrization`, so the module's own forward reads
the updated weight and autograd sends the gradient of ``W`` to ``spf_values`` only:
``dL/dvalues = (dL/dW).flatten()[indices]``.

Every place that adds a delta to a weight (the forward here, :func:`merge_sparse_delta`, and
``apply_delta`` in :mod:`.model`) calls :func:`sparse_add`, so all three give the same bits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "SPF_PREFIX",
    "SparseDeltaParametrization",
    "sparse_add",
    "add_sparse_delta",
    "merge_sparse_delta",
]

SPF_PREFIX = "spf_"
"""Prefix of SPF's tensors in a state dict (``...parametrizations.weight.0.spf_values``)."""


def sparse_add(base: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """Return ``base + scatter(indices, values)`` as a new tensor (``base`` is not modified).

    With unique ``indices`` each touched entry gets exactly one addition ``w0 + v`` in the
    dtype of ``base``, so the result is bitwise reproducible.

    Args:
        base: The weight ``W0``, any shape, contiguous or not.
        indices: ``(nnz,)`` int64 flat row-major positions into ``base``, unique.
        values: ``(nnz,)`` values to add, same dtype as ``base``.

    Returns:
        A tensor shaped like ``base``.
    """
    flat = base.reshape(-1)  # (numel,)
    updated = flat.index_add(0, indices, values)  # (numel,)  w0 + v at indices, w0 elsewhere
    return updated.view(base.shape)  # (*base.shape)


class SparseDeltaParametrization(nn.Module):
    """Parametrization ``W = W0 + scatter(indices, values)`` with ``values`` the only parameter.

    ``values`` start at 0, so a freshly wrapped module computes exactly what it did before.

    Args:
        indices: ``(nnz,)`` int64 flat row-major positions into the weight; sorted, unique.
        dtype: dtype of the weight (``values`` use the same).
        device: device of the weight.
    """

    def __init__(self, indices: Tensor, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        indices = indices.to(device=device, dtype=torch.int64)  # (nnz,)
        values = torch.zeros(indices.numel(), dtype=dtype, device=device)  # (nnz,)
        self.register_buffer("spf_indices", indices)
        self.spf_values = nn.Parameter(values)

    def forward(self, base: Tensor) -> Tensor:
        """Return the updated weight.

        Args:
            base: ``W0``, the frozen original weight.

        Returns:
            ``W0 + scatter(indices, values)``, shaped like ``base``.
        """
        return sparse_add(base, self.spf_indices, self.spf_values)


def add_sparse_delta(module: nn.Module, attr: str, indices: Tensor) -> SparseDeltaParametrization:
    """Parametrize ``module.<attr>`` with a zero sparse delta and freeze the original weight.

    Args:
        module: The module owning the weight (e.g. an ``nn.Linear``).
        attr: Name of the parameter on ``module`` (e.g. ``"weight"``).
        indices: ``(nnz,)`` int64 flat positions into the weight; sorted, unique, in range.

    Returns:
        The registered parametrization; its ``spf_values`` is the trainable parameter.

    Raises:
        ValueError: ``module.<attr>`` is already parametrized (a programming error).
    """
    if parametrize.is_parametrized(module, attr):
        raise ValueError(f"{type(module).__name__}.{attr} is already parametrized")
    weight = getattr(module, attr)
    weight.requires_grad_(False)
    delta = SparseDeltaParametrization(indices, weight.dtype, weight.device)
    parametrize.register_parametrization(module, attr, delta)
    return delta


def merge_sparse_delta(module: nn.Module, attr: str) -> None:
    """Fold the delta into ``module.<attr>`` and remove the parametrization.

    The parameter object keeps its identity and now holds ``W0 + scatter(indices, values)``,
    bitwise equal to what the parametrized forward used.

    Args:
        module: The parametrized module.
        attr: Name of the parametrized parameter.
    """
    parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
