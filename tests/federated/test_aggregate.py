"""Pure aggregation: weighted FedAvg, validation of bad updates, SPF sparse-delta averaging."""

from __future__ import annotations

import pytest
import torch

from shieldtune.adapters.spf import SparseDelta
from shieldtune.adapters.spf.model import DeltaEntry
from shieldtune.errors import ConfigError, IntegrityError
from shieldtune.federated.aggregate import (
    average_sparse,
    fedavg,
    majority_spec,
    screen_updates,
    spec_of,
    validate_update,
)


def _state(value: float, rows: int = 2) -> dict[str, torch.Tensor]:
    return {
        "lora_A": torch.full((rows, 3), value),
        "lora_B": torch.full((3, rows), 2 * value),
        "head.bias": torch.tensor([value, -value]),
    }


def test_fedavg_is_the_sample_weighted_mean():
    # Prepare
    updates = [(_state(1.0), 10), (_state(4.0), 30)]
    # Execute
    out = fedavg(updates)
    # Assert: (1*10 + 4*30) / 40 = 3.25
    torch.testing.assert_close(out["lora_A"], torch.full((2, 3), 3.25))
    torch.testing.assert_close(out["lora_B"], torch.full((3, 2), 6.5))
    torch.testing.assert_close(out["head.bias"], torch.tensor([3.25, -3.25]))
    assert out["lora_A"].dtype == torch.float32


def test_fedavg_of_one_update_is_that_update_and_dtype_is_kept():
    s = {k: v.to(torch.bfloat16) for k, v in _state(0.5).items()}
    out = fedavg([(s, 7)])
    for k in s:
        assert out[k].dtype == torch.bfloat16
        torch.testing.assert_close(out[k], s[k])


def test_fedavg_passes_shared_integer_tensors_and_refuses_differing_ones():
    a = {"w.indices": torch.tensor([1, 5]), "w.values": torch.tensor([1.0, 2.0])}
    b = {"w.indices": torch.tensor([1, 5]), "w.values": torch.tensor([3.0, 4.0])}
    out = fedavg([(a, 1), (b, 1)])
    assert torch.equal(out["w.indices"], torch.tensor([1, 5]))
    torch.testing.assert_close(out["w.values"], torch.tensor([2.0, 3.0]))
    c = {"w.indices": torch.tensor([1, 6]), "w.values": torch.tensor([3.0, 4.0])}
    with pytest.raises(IntegrityError, match="w.indices .*differs"):
        fedavg([(a, 1), (c, 1)])


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({**_state(1.0), "lora_A": torch.full((2, 3), float("nan"))}, "lora_A holds NaN or Inf"),
        ({**_state(1.0), "lora_B": torch.full((3, 2), float("inf"))}, "lora_B holds NaN or Inf"),
        (_state(1.0, rows=4), r"lora_A: shape \(4, 3\)"),
        ({k: v for k, v in _state(1.0).items() if k != "head.bias"}, "missing \\['head.bias'\\]"),
        ({**_state(1.0), "extra": torch.zeros(1)}, "unexpected \\['extra'\\]"),
        ({**_state(1.0), "lora_A": torch.zeros(2, 3, dtype=torch.float64)}, "float64"),
        ({}, "empty"),
    ],
)
def test_validate_update_refuses_malformed_and_non_finite(bad, match):
    with pytest.raises(IntegrityError, match=match):
        validate_update(bad, spec_of(_state(0.0)))
    with pytest.raises(IntegrityError):
        fedavg([(_state(0.0), 1), (bad, 1)])


def test_validate_update_refuses_oversized():
    s = _state(1.0)
    validate_update(s, max_bytes=1000)
    with pytest.raises(IntegrityError, match="oversized: 56 bytes > limit 10"):
        validate_update(s, max_bytes=10)


@pytest.mark.parametrize("weight", [0, -3, float("nan"), float("inf")])
def test_fedavg_refuses_bad_weights(weight):
    with pytest.raises(IntegrityError, match="weight"):
        fedavg([(_state(1.0), 5), (_state(2.0), weight)])


def test_fedavg_refuses_no_updates():
    with pytest.raises(ConfigError, match="no updates"):
        fedavg([])


def test_screen_updates_keeps_the_good_ones_and_names_the_bad():
    nan = {**_state(1.0), "lora_A": torch.full((2, 3), float("nan"))}
    updates = [(_state(1.0), 3), (nan, 3), (_state(1.0, rows=5), 3), (_state(2.0), 0)]
    updates.append((_state(3.0), 1))
    accepted, refused = screen_updates(updates)
    assert accepted == [0, 4]
    assert set(refused) == {1, 2, 3}
    assert "NaN" in refused[1] and "shape" in refused[2] and "num_examples" in refused[3]
    # the aggregate of the accepted ones is not poisoned
    out = fedavg([updates[i] for i in accepted])
    torch.testing.assert_close(out["lora_A"], torch.full((2, 3), 1.5))


def test_majority_spec_outvotes_a_single_malformed_first_update():
    wrong_first = [_state(1.0, rows=9), _state(1.0), _state(2.0)]
    assert majority_spec(wrong_first) == spec_of(_state(0.0))
    assert majority_spec([]) is None


def test_average_sparse_reuses_average_deltas_on_differing_masks():
    a = SparseDelta({"w": DeltaEntry(torch.tensor([0, 2]), torch.tensor([1.0, 2.0]), (4,))})
    b = SparseDelta({"w": DeltaEntry(torch.tensor([2, 3]), torch.tensor([4.0, 8.0]), (4,))})
    out = average_sparse([(a, 1), (b, 3)])
    assert torch.equal(out.entries["w"].indices, torch.tensor([0, 2, 3]))
    torch.testing.assert_close(out.entries["w"].values, torch.tensor([0.25, 3.5, 6.0]))


def test_average_sparse_refuses_non_finite_oversized_and_bad_weight():
    good = SparseDelta({"w": DeltaEntry(torch.tensor([0]), torch.tensor([1.0]), (4,))})
    nan = SparseDelta({"w": DeltaEntry(torch.tensor([0]), torch.tensor([float("nan")]), (4,))})
    with pytest.raises(IntegrityError, match="update 1"):
        average_sparse([(good, 1), (nan, 1)])
    with pytest.raises(IntegrityError, match="oversized"):
        average_sparse([(good, 1)], max_bytes=4)
    with pytest.raises(IntegrityError, match="weight"):
        average_sparse([(good, 0)])
