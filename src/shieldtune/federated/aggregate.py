"""Pure aggregation functions: validate client updates, FedAvg them, average SPF deltas.

An *update* is an adapter state dict (``name -> tensor``, adapter tensors and the classification
head only) plus the number of examples it was trained on. FedAvg is

    global[k] = sum_j n_j * update_j[k] / sum_j n_j          (floating tensors, in float64)

Integer tensors (SPF's shared ``*.indices``) must be identical in every update and pass through.

A *sparse* update (split clients' SPF deltas, whose masks differ) is the state dict of a
``SparseDelta``: ``<param>.indices`` (nnz,) int64, ``<param>.values`` (nnz,) float and
``<param>.shape`` (ndim,) int64 per parameter (:func:`sparse_state`); :func:`sparse_fedavg`
averages them on the union support, optionally with DP (:mod:`~shieldtune.federated.dp`).

Nothing here does I/O or keeps state: the same functions run on the plain server and inside the
server enclave, so that plain and secure FedAvg compute the same numbers. This module imports only
torch, :mod:`shieldtune.errors` and :mod:`~shieldtune.federated.dp` (all part of the enclave's
measurement); SPF's ``SparseDelta`` is imported on first use.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import torch

from shieldtune.errors import ConfigError, IntegrityError
from shieldtune.federated.dp import check_dp, clip_l2, gaussian

__all__ = [
    "Spec",
    "spec_of",
    "state_nbytes",
    "validate_update",
    "majority_spec",
    "screen_updates",
    "fedavg",
    "average_sparse",
    "sparse_state",
    "sparse_from_state",
    "sparse_fedavg",
]

State = Mapping[str, torch.Tensor]
#: name -> (shape, dtype name): the structure every update of a run must have.
Spec = dict[str, tuple[tuple[int, ...], str]]


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def spec_of(state: State) -> Spec:
    """The structure (names, shapes, dtypes) of a state dict."""
    return {name: (tuple(t.shape), _dtype(t)) for name, t in state.items()}


def state_nbytes(state: State) -> int:
    """Bytes of all tensors of a state dict."""
    return sum(t.numel() * t.element_size() for t in state.values())


def validate_update(state: State, spec: Spec | None = None, max_bytes: int | None = None) -> None:
    """Refuse a malformed, oversized or non-finite update.

    Args:
        state: The update (adapter state dict).
        spec: The structure it must have (None: any structure).
        max_bytes: Most bytes the update may hold (None: no limit).

    Raises:
        IntegrityError: Empty, over ``max_bytes``, names / shapes / dtypes differ from ``spec``,
            not a tensor, or a floating tensor holds NaN or Inf; the message names the tensor.
    """
    if not state:
        raise IntegrityError("update is empty: it holds no tensors")
    bad = [n for n, t in state.items() if not isinstance(t, torch.Tensor)]
    if bad:
        raise IntegrityError(f"update entries {bad[:3]} are not tensors")
    size = state_nbytes(state)
    if max_bytes is not None and size > max_bytes:
        raise IntegrityError(
            f"update is oversized: {size} bytes > limit {max_bytes} "
            "(raise federated.max_update_mb if the adapter really is that large)"
        )
    if spec is not None:
        missing = sorted(set(spec) - set(state))
        extra = sorted(set(state) - set(spec))
        if missing or extra:
            raise IntegrityError(
                f"update tensors differ from the global adapter: missing {missing[:3]}, "
                f"unexpected {extra[:3]}"
            )
        for name, t in state.items():
            if (tuple(t.shape), _dtype(t)) != spec[name]:
                shape, dtype = spec[name]
                raise IntegrityError(
                    f"update tensor {name}: shape {tuple(t.shape)} {_dtype(t)}, expected "
                    f"{shape} {dtype}"
                )
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise IntegrityError(f"update tensor {name} holds NaN or Inf values")


def majority_spec(states: Sequence[State]) -> Spec | None:
    """The most common structure among ``states`` (first seen wins a tie); None if empty."""
    if not states:
        return None
    specs = [spec_of(s) for s in states]
    keys = [tuple(sorted((n, v) for n, v in sp.items())) for sp in specs]
    best = Counter(keys).most_common(1)[0][0]
    return specs[keys.index(best)]


def screen_updates(
    updates: Sequence[tuple[State, float]],
    spec: Spec | None = None,
    max_bytes: int | None = None,
    *,
    sparse: bool = False,
) -> tuple[list[int], dict[int, str]]:
    """Validate each update on its own; a bad one is refused without affecting the others.

    Args:
        updates: ``(state, num_examples)`` pairs.
        spec: The structure updates must have; None: the majority structure among them.
        max_bytes: Size limit of one update.
        sparse: The updates are sparse deltas (:func:`sparse_state`; masks may differ, an empty
            one is a zero delta); ``spec`` is not used.

    Returns:
        ``(accepted positions, {refused position: reason})``.
    """
    if spec is None and not sparse:
        spec = majority_spec([s for s, _ in updates if isinstance(s, Mapping) and s])
    accepted: list[int] = []
    refused: dict[int, str] = {}
    for i, (state, weight) in enumerate(updates):
        try:
            w = float(weight)
            if not (math.isfinite(w) and w > 0):
                raise IntegrityError(f"num_examples {weight!r} must be a finite number > 0")
            if sparse:
                _check_delta(i, sparse_from_state(state), w, max_bytes)
            else:
                validate_update(state, spec, max_bytes)
        except (IntegrityError, TypeError, ValueError) as err:
            refused[i] = str(err)
            continue
        accepted.append(i)
    return accepted, refused


def fedavg(
    updates: Sequence[tuple[State, float]], max_bytes: int | None = None
) -> dict[str, torch.Tensor]:
    """Weighted FedAvg of adapter state dicts, weighted by sample counts.

    Floating tensors are averaged in float64 and cast back to their dtype; integer and bool
    tensors (SPF indices) must be equal in every update and are passed through.

    Args:
        updates: ``(state, num_examples)`` pairs; every state has the same structure.
        max_bytes: Size limit of one update.

    Returns:
        The averaged state dict (new tensors, same names, shapes and dtypes).

    Raises:
        ConfigError: No updates.
        IntegrityError: A weight is not finite and > 0, an update is malformed, oversized or
            non-finite, or an integer tensor differs between updates (e.g. SPF masks differ:
            use :func:`average_sparse`).
    """
    if not updates:
        raise ConfigError("fedavg: got no updates; at least one client must answer")
    spec = spec_of(updates[0][0]) if updates[0][0] else None
    weights: list[float] = []
    for i, (state, weight) in enumerate(updates):
        w = float(weight)
        if not (math.isfinite(w) and w > 0):
            raise IntegrityError(f"fedavg: update {i} has weight {weight!r}; need finite and > 0")
        try:
            validate_update(state, spec, max_bytes)
        except IntegrityError as err:
            raise IntegrityError(f"fedavg: update {i}: {err}") from None
        weights.append(w)
    total = math.fsum(weights)
    out: dict[str, torch.Tensor] = {}
    for name, first in updates[0][0].items():
        if not first.is_floating_point():
            for i, (state, _) in enumerate(updates[1:], start=1):
                if not torch.equal(state[name], first):
                    raise IntegrityError(
                        f"fedavg: integer tensor {name} of update {i} differs from update 0 "
                        "(SPF masks must be shared; average differing masks with average_sparse)"
                    )
            out[name] = first.clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64)  # (same shape as the tensor)
        for (state, _), w in zip(updates, weights, strict=True):
            acc += state[name].detach().to(torch.float64) * w
        out[name] = (acc / total).to(first.dtype)
    return out


def _check_delta(i: int, delta: object, weight: float, max_bytes: int | None) -> None:
    from shieldtune.adapters.spf.model import SparseDelta

    if not isinstance(delta, SparseDelta):
        raise IntegrityError(f"average_sparse: update {i} is {type(delta).__name__}")
    w = float(weight)
    if not (math.isfinite(w) and w > 0):
        raise IntegrityError(f"average_sparse: update {i} has weight {weight!r}")
    if max_bytes is not None and delta.nbytes() > max_bytes:
        raise IntegrityError(
            f"average_sparse: update {i} is oversized: {delta.nbytes()} bytes > {max_bytes}"
        )
    try:
        delta.validate()
    except IntegrityError as err:
        raise IntegrityError(f"average_sparse: update {i}: {err}") from None


def average_sparse(updates: Sequence[tuple[object, float]], max_bytes: int | None = None) -> object:
    """FedAvg of SPF sparse deltas whose masks may differ (a missing entry counts as zero).

    Reuses :func:`shieldtune.adapters.spf.average_deltas` (imported here, on first use, so that
    this module stays light inside the enclave).

    Args:
        updates: ``(SparseDelta, num_examples)`` pairs.
        max_bytes: Size limit of one delta (indices + values).

    Returns:
        The averaged ``SparseDelta`` (union of the indices, weighted mean of the values).

    Raises:
        ConfigError: No deltas, or a parameter's shape or dtype differs between deltas.
        IntegrityError: A weight is not finite and > 0, a delta is oversized or corrupt
            (non-finite values, out-of-range or unsorted indices).
    """
    from shieldtune.adapters.spf.model import average_deltas

    for i, (delta, weight) in enumerate(updates):
        _check_delta(i, delta, weight, max_bytes)
    return average_deltas(updates)  # type: ignore[arg-type]


def sparse_state(delta: object) -> dict[str, torch.Tensor]:
    """A ``SparseDelta`` as a state dict: ``<p>.indices``, ``<p>.values``, ``<p>.shape``."""
    out: dict[str, torch.Tensor] = {}
    for name, e in delta.entries.items():  # type: ignore[attr-defined]
        out[f"{name}.indices"] = e.indices
        out[f"{name}.values"] = e.values
        out[f"{name}.shape"] = torch.tensor(list(e.shape), dtype=torch.int64)
    return out


def sparse_from_state(state: State) -> object:
    """The ``SparseDelta`` of a :func:`sparse_state` dict (an empty dict: the empty delta).

    Raises:
        IntegrityError: Names that are not ``<p>.indices/values/shape`` triples, a shape that is
            not a 1-D int64 tensor of sizes >= 0, or a corrupt entry (see ``SparseDelta``).
    """
    from shieldtune.adapters.spf.model import DeltaEntry, SparseDelta

    if not isinstance(state, Mapping):
        raise IntegrityError(f"sparse update is {type(state).__name__}, not a state dict")
    params = {name.rpartition(".")[0] for name in state}
    expected = {f"{p}.{part}" for p in params for part in ("indices", "values", "shape")}
    if set(state) != expected or "" in params:
        odd = sorted(set(state) ^ expected)[:3]
        raise IntegrityError(f"sparse update: tensors {odd} break the indices/values/shape triples")
    entries = {}
    for p in sorted(params):
        shape = state[f"{p}.shape"]
        if not isinstance(shape, torch.Tensor) or shape.dtype != torch.int64 or shape.dim() != 1:
            raise IntegrityError(f"sparse update: {p}.shape must be a 1-D int64 tensor")
        if bool((shape < 0).any()):
            raise IntegrityError(f"sparse update: {p}.shape holds a negative size")
        entries[p] = DeltaEntry(state[f"{p}.indices"], state[f"{p}.values"], tuple(shape.tolist()))
    delta = SparseDelta(entries)
    delta.validate()
    return delta


def _dense_on(union: torch.Tensor, entry: object | None) -> torch.Tensor:
    """An entry's values scattered onto the sorted ``union`` of indices, (u,) float64."""
    out = torch.zeros(union.numel(), dtype=torch.float64)  # (u,)
    if entry is not None:
        pos = torch.searchsorted(union, entry.indices)  # type: ignore[attr-defined]  (nnz,)
        out[pos] = entry.values.double()  # type: ignore[attr-defined]
    return out


def sparse_fedavg(
    updates: Sequence[tuple[State, float]],
    reference: State | None = None,
    *,
    clip: float | None = None,
    sigma: float = 0.0,
    max_bytes: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """FedAvg of sparse deltas on the union support, optionally with DP.

    Without DP this is :func:`average_sparse`. With ``clip`` C, each client's update relative
    to the previous global delta g (``reference``; zero in round 1) is clipped and averaged,
    and Gaussian noise is added on the union support U of every delta and g::

        Δ_j = d_j − g on U;   new = g + Σ_j w_j clip_C(Δ_j) / Σ_j w_j + N(0, (σ·C·s)²),
        s = max_j w_j / Σ_j w_j

    The indices (which entries changed) are not covered by the noise.

    Args:
        updates: ``(sparse state, num_examples)`` pairs (:func:`sparse_state`).
        reference: The previous global delta (sparse state), None or empty before round 1.
        clip: C > 0, the L2 bound of one client's update (None: no DP).
        sigma: σ >= 0, the noise multiplier (needs ``clip``).
        max_bytes: Size limit of one delta.
        generator: Source of the noise (None: the OS CSPRNG).

    Returns:
        The new global delta as a sparse state dict.

    Raises:
        ConfigError: No updates, bad DP settings, or a parameter's shape or dtype differs.
        IntegrityError: A malformed, oversized or non-finite delta, or a bad weight.
    """
    check_dp(clip, sigma)
    deltas = [(sparse_from_state(s), float(w)) for s, w in updates]
    if clip is None:
        return sparse_state(average_sparse(deltas, max_bytes))
    if not deltas:
        raise ConfigError("sparse_fedavg: got no updates; at least one client must answer")
    for i, (delta, weight) in enumerate(deltas):
        _check_delta(i, delta, weight, max_bytes)
    ref = sparse_from_state(reference or {})
    everyone = [d for d, _ in deltas] + [ref]
    names = list(dict.fromkeys(n for d in everyone for n in d.entries))  # type: ignore[attr-defined]
    unions, kinds = {}, {}
    for name in names:
        present = [d.entries[name] for d in everyone if name in d.entries]  # type: ignore[attr-defined]
        if len({(e.shape, e.values.dtype) for e in present}) > 1:
            raise ConfigError(f"sparse_fedavg: {name} has different shapes/dtypes across deltas")
        unions[name] = torch.unique(torch.cat([e.indices for e in present]))  # (u,) sorted
        kinds[name] = present[0]
    glob = {n: _dense_on(u, ref.entries.get(n)) for n, u in unions.items()}  # type: ignore[attr-defined]
    total = math.fsum(w for _, w in deltas)
    share = max(w for _, w in deltas) / total
    avg = {n: torch.zeros_like(g) for n, g in glob.items()}
    for delta, w in deltas:
        update = {n: _dense_on(u, delta.entries.get(n)) - glob[n] for n, u in unions.items()}  # type: ignore[attr-defined]
        for n, t in clip_l2(update, clip).items():
            avg[n] += t * (w / total)  # (u,)
    out = {}
    for n, union in unions.items():
        noise = gaussian((union.numel(),), generator)  # (u,)
        values = (glob[n] + avg[n] + noise * (sigma * clip * share)).to(kinds[n].values.dtype)
        out[n] = type(kinds[n])(union, values, kinds[n].shape)
    return sparse_state(type(ref)(out))
