"""Seeded train/test splits and IID / Dirichlet client partitions."""

from __future__ import annotations

from collections import Counter

import pytest

from shieldtune.data import (
    generate_medical_sample,
    partition_dirichlet,
    partition_iid,
    subset,
    train_test_indices,
    train_test_split,
)
from shieldtune.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def sample():
    return generate_medical_sample()


def test_split_is_deterministic_disjoint_and_covering(sample) -> None:
    train, test = train_test_split(sample, 0.2, seed=7)
    train2, test2 = train_test_split(sample, 0.2, seed=7)
    other_train, other_test = train_test_split(sample, 0.2, seed=8)

    assert (len(train), len(test)) == (320, 80)
    assert train.examples == train2.examples and test.examples == test2.examples
    assert test.examples != other_test.examples
    tr, te = train_test_indices(sample.labels(), 0.2, seed=7)
    assert not set(tr) & set(te)
    assert sorted(tr + te) == list(range(len(sample)))
    assert test.label_names == sample.label_names and test.name == sample.name


def test_split_does_not_touch_global_random_state(sample) -> None:
    import random

    import torch

    random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), torch.rand(1).item())
    random.seed(1)
    torch.manual_seed(1)

    train_test_split(sample, 0.3, seed=3)

    assert (random.random(), torch.rand(1).item()) == expected


def test_stratified_split_keeps_proportions(sample) -> None:
    _, test = train_test_split(sample, 0.25, seed=0, stratify=True)

    assert len(test) == 100
    assert Counter(test.labels()) == {c: 20 for c in range(5)}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(sample, fraction: float) -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        train_test_split(sample, fraction)


def test_split_needs_two_examples(sample) -> None:
    with pytest.raises(DataError, match="need at least 2"):
        train_test_split(subset(sample, [0]))


def test_subset_order_and_range(sample) -> None:
    part = subset(sample, [5, 2])

    assert part.examples == [sample[5], sample[2]]
    with pytest.raises(DataError, match="index 400 out of range"):
        subset(sample, [400])


def test_iid_partition(sample) -> None:
    parts = partition_iid(len(sample), 3, seed=0)

    assert [len(p) for p in parts] == [134, 133, 133]
    assert sorted(i for p in parts for i in p) == list(range(400))
    assert parts == partition_iid(400, 3, seed=0)
    assert parts != partition_iid(400, 3, seed=1)
    assert partition_iid(5, 1, seed=0) == [[0, 1, 2, 3, 4]]


def test_iid_rejects_bad_clients() -> None:
    with pytest.raises(ConfigError, match="num_clients"):
        partition_iid(10, 0, seed=0)
    with pytest.raises(ConfigError, match=r"num_clients \(11\) exceeds"):
        partition_iid(10, 11, seed=0)


def _mean_max_share(labels: list[int], parts: list[list[int]]) -> float:
    shares = []
    for p in parts:
        counts = Counter(labels[i] for i in p)
        shares.append(max(counts.values()) / len(p))
    return sum(shares) / len(shares)


def test_dirichlet_skew_and_coverage(sample) -> None:
    labels = sample.labels()

    skewed = partition_dirichlet(labels, 5, alpha=0.1, seed=0, min_size=5)
    near_iid = partition_dirichlet(labels, 5, alpha=100.0, seed=0)

    for parts in (skewed, near_iid):
        assert sorted(i for p in parts for i in p) == list(range(len(labels)))
    assert min(len(p) for p in skewed) >= 5
    assert _mean_max_share(labels, skewed) > 0.6
    assert _mean_max_share(labels, near_iid) < 0.35
    assert skewed == partition_dirichlet(labels, 5, alpha=0.1, seed=0, min_size=5)
    assert skewed != partition_dirichlet(labels, 5, alpha=0.1, seed=1, min_size=5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_clients": 0, "alpha": 1.0}, "num_clients"),
        ({"num_clients": 2, "alpha": 0.0}, "alpha"),
        ({"num_clients": 2, "alpha": -1.0}, "alpha"),
        ({"num_clients": 2, "alpha": 1.0, "min_size": -1}, "min_size"),
        ({"num_clients": 5, "alpha": 1.0, "min_size": 3}, "cannot give 5 clients"),
    ],
)
def test_dirichlet_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        partition_dirichlet([0, 1, 0, 1, 0, 1, 0], seed=0, **kwargs)


def test_dirichlet_gives_up_with_advice() -> None:
    # one class, tiny alpha: nearly all items land on one client in every draw
    with pytest.raises(ConfigError, match="raise alpha"):
        partition_dirichlet([0] * 20, 4, alpha=1e-3, seed=0, min_size=4, max_tries=20)
