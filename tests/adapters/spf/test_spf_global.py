"""Federated SPF on a front slice: load a global delta wider than the own mask, report the whole
difference from the base, and average those exactly as FedAvg of the front weights."""

from __future__ import annotations

import copy

import torch
from _tiny import padded_batch

from shieldtune.adapters.spf import (
    SparseDelta,
    SPFConfig,
    apply_delta,
    attach_spf,
    average_deltas,
)
from shieldtune.models import load_model, slice_model


def _front(seed: int):
    model = load_model("tiny-llama", "seq-cls", 2, seed=0).model
    front, _ = slice_model(model, 2)
    for p in front.parameters():
        p.requires_grad_(False)
    spf = attach_spf(front, model, SPFConfig(density=0.02, saliency="random", seed=seed))
    return front, spf


def _train(spf, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in spf.spf.trainable_parameters():
            v.add_(torch.randn(v.shape, generator=gen) * 0.1)


def _dense_front(front):
    """The front's effective weights as plain tensors (parametrizations evaluated)."""
    return {n: p.detach().clone() for n, p in front.state_dict().items()}


def test_whole_deltas_average_to_fedavg_of_the_front_weights() -> None:
    # Prepare: two clients with different masks, trained apart
    (f0, a), (_, b) = _front(1), _front(2)
    assert any(
        not torch.equal(a.spf.indices[n], b.spf.indices[n]) for n in a.spf.indices
    )  # the masks differ
    _train(a, 0), _train(b, 1)
    ids, mask = padded_batch(seed=3)
    # Execute: the 1:3 average of their whole deltas, loaded into client a
    glob = average_deltas([(a.whole_delta(), 1.0), (b.whole_delta(), 3.0)])
    a.load_global(glob)
    # Assert: a's front is now base + glob (as a fresh base model with the delta applied)...
    fresh = load_model("tiny-llama", "seq-cls", 2, seed=0).model
    apply_delta(slice_model(fresh, 2)[0], glob)
    ref_front, _ = slice_model(fresh, 2)
    torch.testing.assert_close(f0(ids, mask), ref_front(ids, mask), atol=1e-6, rtol=0)
    # ...and its whole delta is exactly the global (own values and off-mask entries together)
    whole = a.whole_delta()
    for name, entry in glob.entries.items():
        assert torch.equal(whole.entries[name].indices, entry.indices), name
        assert torch.equal(whole.entries[name].values, entry.values), name
    # training on changes only a's own mask entries of the whole delta
    _train(a, 5)
    moved = a.whole_delta()
    for name, entry in glob.entries.items():
        on = torch.isin(entry.indices, a.spf.indices.get(name, torch.empty(0, dtype=torch.long)))
        assert torch.equal(moved.entries[name].values[~on], entry.values[~on]), name


def test_a_new_global_replaces_the_old_one_everywhere() -> None:
    # Prepare
    (f0, a), (_, b) = _front(1), _front(2)
    base = copy.deepcopy(_dense_front(f0))
    _train(b, 1)
    first = b.whole_delta()
    # Execute: load b's delta, then the empty delta
    a.load_global(first)
    changed = _dense_front(f0)
    a.load_global(SparseDelta({}))
    # Assert: the first global changed the front; the empty one restores the base exactly
    assert any(not torch.equal(changed[n], v) for n, v in base.items())
    restored = _dense_front(f0)
    for name, value in base.items():
        assert torch.equal(restored[name], value), name
    assert a.whole_delta().nnz == a.delta().nnz
    assert all(bool((v == 0).all()) for v in a.spf.trainable_parameters())
