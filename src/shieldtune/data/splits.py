"""Seeded splits and client partitions.

Every function takes an explicit seed and uses its own generator (``random.Random`` or
``numpy.random.Generator``), never global random state, so the same seed gives the same
split on every run and machine, whatever else the program draws.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from shieldtune.data.tables import Dataset
from shieldtune.errors import ConfigError, DataError

__all__ = [
    "partition_dirichlet",
    "partition_iid",
    "subset",
    "train_test_indices",
    "train_test_split",
]


def subset(ds: Dataset, indices: Sequence[int]) -> Dataset:
    """Return the examples at ``indices`` (in that order) as a new dataset.

    The label names and the dataset name are kept.

    Args:
        ds: The source dataset.
        indices: Positions into ``ds``; repeats are allowed.

    Returns:
        The subset.

    Raises:
        DataError: An index is out of range.
    """
    n = len(ds)
    out = []
    for i in indices:
        i = int(i)
        if not 0 <= i < n:
            raise DataError(f"subset of {ds.name!r}: index {i} out of range 0..{n - 1}")
        out.append(ds.examples[i])
    return Dataset(examples=out, label_names=list(ds.label_names), name=ds.name)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def train_test_indices(
    labels: Sequence[int],
    test_fraction: float = 0.2,
    seed: int = 0,
    *,
    stratify: bool = False,
) -> tuple[list[int], list[int]]:
    """Split positions ``0..n-1`` into train and test positions.

    Args:
        labels: The label of every item (only its length matters unless ``stratify``).
        test_fraction: Share of the items in the test part, in (0, 1).
        seed: Seed of the shuffle.
        stratify: Split every class separately so both parts keep the class proportions.

    Returns:
        ``(train, test)`` positions, each sorted ascending; disjoint, together all of
        ``0..n-1``, both non-empty.

    Raises:
        ConfigError: ``test_fraction`` is not in (0, 1) or ``seed`` is not an integer.
        DataError: Fewer than two items.
    """
    if not isinstance(test_fraction, (int, float)) or not 0.0 < float(test_fraction) < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    rng = random.Random(_check_seed(seed))
    n = len(labels)
    if n < 2:
        raise DataError(f"cannot split {n} item(s) into train and test; need at least 2")
    n_test = min(max(round(n * test_fraction), 1), n - 1)
    if not stratify:
        order = list(range(n))
        rng.shuffle(order)
        test = order[:n_test]
    else:
        by_class: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_class.setdefault(int(y), []).append(i)
        test = []
        leftovers: list[tuple[float, int, list[int]]] = []
        for y in sorted(by_class):
            members = by_class[y]
            rng.shuffle(members)
            exact = len(members) * n_test / n
            take = int(exact)
            test.extend(members[:take])
            leftovers.append((exact - take, y, members[take:]))
        # hand out the remaining test slots to the classes with the largest remainders
        leftovers.sort(key=lambda t: (-t[0], t[1]))
        for _, _, rest in leftovers:
            if len(test) >= n_test:
                break
            if rest:
                test.append(rest[0])
    test_set = set(test)
    train = [i for i in range(n) if i not in test_set]
    return train, sorted(test_set)


def train_test_split(
    ds: Dataset, test_fraction: float = 0.2, seed: int = 0, *, stratify: bool = False
) -> tuple[Dataset, Dataset]:
    """Split a dataset into a train and a test part, reproducibly.

    The same ``(len(ds), test_fraction, seed)`` always gives the same split, so every method
    compared can use the same test set; record the seed with the results.

    Args:
        ds: The dataset.
        test_fraction: Share of the examples in the test part, in (0, 1); rounded, and at
            least one example goes to each part.
        seed: Seed of the shuffle.
        stratify: Keep the class proportions in both parts.

    Returns:
        ``(train, test)``, each in the original example order.

    Raises:
        ConfigError: ``test_fraction`` is not in (0, 1) or ``seed`` is not an integer.
        DataError: Fewer than two examples.
    """
    train, test = train_test_indices(ds.labels(), test_fraction, seed, stratify=stratify)
    return subset(ds, train), subset(ds, test)


def _check_clients(num_clients: int) -> int:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    return int(num_clients)


def partition_iid(n_items: int, num_clients: int, seed: int) -> list[list[int]]:
    """Partition ``0..n_items-1`` uniformly at random into near-equal client shares.

    Args:
        n_items: Number of items.
        num_clients: Number of clients (>= 1, at most ``n_items``).
        seed: Seed of the shuffle.

    Returns:
        One sorted index list per client; sizes differ by at most one; disjoint and covering.

    Raises:
        ConfigError: ``num_clients`` < 1 or more clients than items, or a bad seed.
    """
    k = _check_clients(num_clients)
    if n_items < k:
        raise ConfigError(
            f"num_clients ({k}) exceeds the number of items ({n_items}); every client needs "
            "at least one item"
        )
    order = list(range(n_items))
    random.Random(_check_seed(seed)).shuffle(order)
    base, extra = divmod(n_items, k)
    parts: list[list[int]] = []
    start = 0
    for c in range(k):
        size = base + (1 if c < extra else 0)
        parts.append(sorted(order[start : start + size]))
        start += size
    return parts


def partition_dirichlet(
    labels: Sequence[int],
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    *,
    max_tries: int = 1000,
) -> list[list[int]]:
    """Partition items across clients with per-class Dirichlet proportions (non-IID).

    The standard label-skew split (Hsu et al., 2019): for every class, the proportions of its
    items given to each client are drawn from ``Dirichlet(alpha, ..., alpha)``. Small
    ``alpha`` (0.1) gives each client few classes; large ``alpha`` (100) approaches IID. The
    whole draw is repeated, with fresh draws, until every client holds at least ``min_size``
    items.

    Args:
        labels: The label of every item.
        num_clients: Number of clients (>= 1).
        alpha: Dirichlet concentration (> 0).
        seed: Seed of the draws.
        min_size: Fewest items a client may get (>= 0).
        max_tries: How many draws to try before giving up.

    Returns:
        One sorted index list per client; disjoint and covering ``0..len(labels)-1``.

    Raises:
        ConfigError: A bad argument, or no draw within ``max_tries`` gave every client
            ``min_size`` items (the message says which knob to turn).
    """
    k = _check_clients(num_clients)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {alpha!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ConfigError(f"min_size must be an integer >= 0, got {min_size!r}")
    if max_tries < 1:
        raise ConfigError(f"max_tries must be >= 1, got {max_tries!r}")
    n = len(labels)
    if k * min_size > n:
        raise ConfigError(
            f"cannot give {k} clients at least {min_size} item(s) each from {n} items; "
            "lower num_clients or min_size"
        )
    rng = np.random.default_rng(_check_seed(seed))
    by_class: dict[int, np.ndarray] = {}
    for y in sorted({int(v) for v in labels}):
        by_class[y] = np.array([i for i, v in enumerate(labels) if int(v) == y], dtype=np.int64)

    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(k)]
        for y in by_class:
            members = by_class[y].copy()
            rng.shuffle(members)
            props = np.nan_to_num(rng.dirichlet(np.full(k, float(alpha))), nan=0.0)
            cuts = (np.cumsum(props)[:-1] * len(members)).astype(np.int64)
            for c, chunk in enumerate(np.split(members, cuts)):
                parts[c].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ConfigError(
        f"partition_dirichlet: no draw in {max_tries} gave all {k} clients at least "
        f"{min_size} item(s) (alpha={alpha}, {n} items); raise alpha, or lower num_clients "
        "or min_size"
    )
