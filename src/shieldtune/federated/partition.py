"""Client shares: which training rows and which held-out test rows each client holds.

Training rows are split IID or by per-class Dirichlet(α) proportions (label skew) with
:mod:`shieldtune.data.splits`; the held-out test split is split IID and the shares cover it, so
the sample-weighted means of the clients' test loss and accuracy are the global adapter's on the
whole test split, and the sum of their confusion matrices is its confusion matrix (macro-F1 is
scored from that sum: a mean of the shares' macro-F1 is not the whole split's).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shieldtune.data.splits import partition_dirichlet, partition_iid
from shieldtune.errors import ConfigError

__all__ = ["client_shares", "take"]


def client_shares(
    train_labels: Sequence[int] | None,
    n_train: int,
    n_test: int,
    num_clients: int,
    partition: str,
    alpha: float,
    seed: int,
) -> list[tuple[list[int], list[int]]]:
    """``(train rows, test rows)`` of each client; disjoint and covering within each split.

    Args:
        train_labels: Class of every training row (needed by ``dirichlet``; None for LM tasks).
        n_train: Training rows.
        n_test: Test rows.
        num_clients: Number of clients.
        partition: ``iid`` or ``dirichlet``.
        alpha: Dirichlet concentration.
        seed: Seed of both partitions.

    Raises:
        ConfigError: Unknown partition, Dirichlet without class labels, or more clients than
            rows in a split.
    """
    if partition == "iid":
        train = partition_iid(n_train, num_clients, seed)
    elif partition == "dirichlet":
        if train_labels is None:
            raise ConfigError(
                "federated.partition: 'dirichlet' needs class labels (task seq-cls); use 'iid'"
            )
        train = partition_dirichlet(list(train_labels), num_clients, alpha, seed)
    else:
        raise ConfigError(f"federated.partition: {partition!r} unknown; accepted: iid, dirichlet")
    test = partition_iid(n_test, num_clients, seed + 1)
    return list(zip(train, test, strict=True))


def take(encoded: dict[str, torch.Tensor], rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """The given rows of every tensor of an encoded split."""
    index = torch.tensor(list(rows), dtype=torch.long)
    return {k: v.index_select(0, index) for k, v in encoded.items()}
