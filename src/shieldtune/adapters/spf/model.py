"""SPF on a whole model: wrap the chosen entries, export them as a sparse delta, merge.

The life of an SPF adapter::

    spf = SPFModel.from_saliency(model, SPFConfig(density=0.01), loss_fn=warmup_loss)
    opt = torch.optim.AdamW(spf.trainable_parameters(), weight_decay=0.1)
    ...  # train `model` as usual; only the chosen entries change
    spf.export_delta().save("client0.spf.safetensors")     # indices + values
    apply_delta(fresh_model, SparseDelta.load("client0.spf.safetensors", module=fresh_model))

A delta applied to a fresh copy of the base model reproduces the trained weights bit for bit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from os import PathLike
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from shieldtune.adapters.spf.config import SPFConfig
from shieldtune.adapters.spf.layer import add_sparse_delta, merge_sparse_delta, sparse_add
from shieldtune.adapters.spf.saliency import score, select_targets, top_k_mask
from shieldtune.errors import ConfigError, IntegrityError, ShieldtuneError

__all__ = [
    "DELTA_FORMAT",
    "DELTA_FORMAT_VERSION",
    "DeltaEntry",
    "SparseDelta",
    "SPFModel",
    "apply_delta",
    "average_deltas",
]

DELTA_FORMAT = "shieldtune-spf-delta"
DELTA_FORMAT_VERSION = "1"


class DeltaEntry(NamedTuple):
    """The sparse delta of one parameter.

    Attributes:
        indices: ``(nnz,)`` int64 flat row-major positions into the parameter; sorted, unique.
        values: ``(nnz,)`` floating values added at those positions (dtype of the parameter).
        shape: Shape of the parameter.
    """

    indices: Tensor
    values: Tensor
    shape: tuple[int, ...]


@dataclass
class SparseDelta:
    """A sparse update of some parameters: parameter name -> :class:`DeltaEntry`.

    Names are those of the unwrapped module (``"model.layers.0.mlp.up_proj.weight"``).

    Attributes:
        entries: Parameter name -> (indices, values, shape).
    """

    entries: dict[str, DeltaEntry]

    @property
    def nnz(self) -> int:
        """Number of changed entries over all parameters."""
        return sum(e.indices.numel() for e in self.entries.values())

    @property
    def density(self) -> float:
        """Fraction of the listed parameters' entries that the delta touches."""
        total = sum(math.prod(e.shape) for e in self.entries.values())
        return self.nnz / total if total else 0.0

    def nbytes(self) -> int:
        """Communication size: bytes of all indices and values (the file adds a small header)."""
        sizes = (
            e.indices.numel() * e.indices.element_size()
            + e.values.numel() * e.values.element_size()
            for e in self.entries.values()
        )
        return sum(sizes)

    def validate(self) -> None:
        """Check every entry's structure.

        Raises:
            IntegrityError: Naming each bad parameter: indices not 1-D int64, out of range, not
                strictly increasing; values not 1-D floating or not finite; lengths differ.
        """
        problems = [p for name, e in self.entries.items() for p in _entry_problems(name, e)]
        if problems:
            raise IntegrityError("invalid SPF delta: " + "; ".join(problems))

    def save(self, path: str | PathLike[str]) -> None:
        """Write the delta as safetensors (``<name>.indices``, ``<name>.values`` + metadata).

        Args:
            path: Output file.

        Raises:
            IntegrityError: The delta is invalid (see :meth:`validate`); nothing is written.
        """
        self.validate()
        tensors: dict[str, Tensor] = {}
        for name, e in self.entries.items():
            tensors[f"{name}.indices"] = e.indices.detach().cpu().contiguous()
            tensors[f"{name}.values"] = e.values.detach().cpu().contiguous()
        metadata = {
            "format": DELTA_FORMAT,
            "format_version": DELTA_FORMAT_VERSION,
            "shapes": json.dumps({n: list(e.shape) for n, e in self.entries.items()}),
            "dtypes": json.dumps({n: _dtype_name(e.values.dtype) for n, e in self.entries.items()}),
            "density": repr(self.density),
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | PathLike[str], module: nn.Module | None = None) -> SparseDelta:
        """Read and validate a delta written by :meth:`save`.

        Args:
            path: The file.
            module: If given, also check that every parameter exists in it with the same
                shape and dtype (as :func:`apply_delta` does).

        Returns:
            The delta, on CPU.

        Raises:
            IntegrityError: The file is not an SPF delta, or an entry is corrupt (out-of-range
                or unsorted indices, non-finite values, length mismatch); names the parameter.
            ConfigError: ``module`` is given and a parameter is missing or differs in shape.
        """
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except SafetensorError as err:
            raise IntegrityError(f"{path}: not a readable safetensors file ({err})") from None
        delta = _from_tensors(str(path), metadata, tensors)
        if module is not None:
            _check_fits(module, delta)
        return delta


class SPFModel:
    """Handle on a module whose target weights carry trainable SPF sparse deltas.

    The module is modified in place: each target weight is parametrized as
    ``W = W0 + scatter(indices, values)`` (see :mod:`.layer`) and every other parameter of the
    module, ``W0`` included, gets ``requires_grad=False``. Train ``module`` as usual with an
    optimizer over :meth:`trainable_parameters`; even an optimizer over ``module.parameters()``
    with weight decay changes only the chosen entries, since nothing else has a gradient.

    Args:
        module: The model (or front slice) to wrap.
        indices: Parameter name -> ``(nnz,)`` int64 flat positions to train (sorted, unique).
            Names with no positions are skipped.

    Raises:
        ConfigError: A name is not a parameter of ``module``, is shared with another module,
            or its indices are invalid.
    """

    def __init__(self, module: nn.Module, indices: dict[str, Tensor]) -> None:
        _check_indices(module, indices)
        self.module = module
        self._flags = [(p, p.requires_grad) for p in module.parameters()]
        for p, _ in self._flags:
            p.requires_grad_(False)
        self._targets: dict[str, tuple[nn.Module, str]] = {}
        for name, idx in indices.items():
            if idx.numel() == 0:
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            add_sparse_delta(owner, attr, idx)
            self._targets[name] = (owner, attr)
        self._merged = False

    @classmethod
    def from_saliency(
        cls,
        module: nn.Module,
        config: SPFConfig,
        loss_fn: Callable[[int], Tensor] | None = None,
        exclude: Collection[nn.Parameter] = (),
    ) -> SPFModel:
        """Choose the entries once by the config's saliency rule, then wrap the module.

        Args:
            module: The model (or front slice).
            config: Density, rule, warm-up batches, targets, seed.
            loss_fn: ``loss_fn(i)`` returns the scalar loss of warm-up batch ``i``; needed by
                the ``"gradient"`` rule. No ``.grad`` is left behind.
            exclude: Parameters never sparsified (e.g. a classification head that trains
                densely anyway).

        Returns:
            The wrapped model; exactly ``max(1, round(density * total))`` entries train.

        Raises:
            ConfigError: Nothing matches ``target_modules``, or ``"gradient"`` lacks ``loss_fn``.
            ShieldtuneError: A saliency score is NaN or infinite (e.g. a diverged warm-up loss).
        """
        skip = {id(p) for p in exclude}
        targets = {
            n: p
            for n, p in select_targets(module, config.target_modules).items()
            if id(p) not in skip
        }
        if not targets:
            raise ConfigError(
                "spf.target_modules: every selected weight is one that trains densely anyway "
                "(the classification head); name other weights"
            )
        generator = torch.Generator().manual_seed(config.seed)
        scores = score(
            targets,
            config.saliency,
            loss_fn=loss_fn,
            warmup_batches=config.warmup_batches,
            generator=generator,
        )
        masks = top_k_mask(scores, config.density)
        indices = {
            name: mask.reshape(-1).nonzero().squeeze(1).cpu() for name, mask in masks.items()
        }
        return cls(module, indices)

    @property
    def indices(self) -> dict[str, Tensor]:
        """Parameter name -> ``(nnz,)`` int64 trained positions."""
        self._check_live()
        return {name: self._delta(name).spf_indices for name in self._targets}

    def base_weight(self, name: str) -> Tensor:
        """The frozen weight parameter ``name`` adds its delta to (a plain one if not wrapped)."""
        self._check_live()
        if name in self._targets:
            owner, attr = self._targets[name]
            return owner.parametrizations[attr].original
        return self.module.get_parameter(name)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The ``(nnz,)`` value vectors, one per wrapped parameter: all that may train."""
        self._check_live()
        return [self._delta(name).spf_values for name in self._targets]

    def export_delta(self) -> SparseDelta:
        """Snapshot the trained entries as a CPU :class:`SparseDelta`.

        Returns:
            Parameter name -> (indices, values, shape), values detached and cloned.
        """
        self._check_live()
        entries = {}
        for name, (owner, attr) in self._targets.items():
            delta = self._delta(name)
            shape = tuple(owner.parametrizations[attr].original.shape)
            indices = delta.spf_indices.detach().cpu().clone()  # (nnz,)
            values = delta.spf_values.detach().cpu().clone()  # (nnz,)
            entries[name] = DeltaEntry(indices, values, shape)
        return SparseDelta(entries)

    def merge(self) -> nn.Module:
        """Fold the deltas into the weights and remove the parametrizations.

        Afterwards the module holds plain weights bitwise equal to what the parametrized forward
        used, and every parameter's ``requires_grad`` is what it was before wrapping. The
        handle cannot be used any more.

        Returns:
            The (same) module.
        """
        self._check_live()
        for owner, attr in self._targets.values():
            merge_sparse_delta(owner, attr)
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self._merged = True
        return self.module

    def _delta(self, name: str) -> nn.Module:
        owner, attr = self._targets[name]
        return owner.parametrizations[attr][0]

    def _check_live(self) -> None:
        if self._merged:
            raise ShieldtuneError("this SPFModel was merged; wrap the module again to train more")


def apply_delta(module: nn.Module, delta: SparseDelta) -> nn.Module:
    """Add a delta into a fresh (unwrapped) module's weights, in place and exactly.

    ``W <- W + scatter(indices, values)``, computed as the parametrized forward computes it, so a
    fresh copy of the base model plus the exported delta equals the trained model bit for bit.

    Args:
        module: A module with plain parameters named as in the delta.
        delta: The delta.

    Returns:
        The (same) module.

    Raises:
        IntegrityError: The delta is corrupt (see :meth:`SparseDelta.validate`).
        ConfigError: A parameter is missing (or SPF-wrapped), or differs in shape or dtype.
    """
    delta.validate()
    _check_fits(module, delta)
    with torch.no_grad():
        for name, e in delta.entries.items():
            param = module.get_parameter(name)
            indices = e.indices.to(param.device)  # (nnz,)
            values = e.values.to(param.device)  # (nnz,)
            param.copy_(sparse_add(param, indices, values))
    return module


def average_deltas(items: Iterable[tuple[SparseDelta, float]]) -> SparseDelta:
    """Weighted mean of sparse deltas (e.g. FedAvg of clients' SPF deltas).

    The result holds, for each parameter, the union of the inputs' indices (sorted); at each of
    them the value is ``sum_j w_j * v_j / sum_j w_j`` over all inputs, where ``v_j = 0`` when
    input ``j`` does not hold that entry (or that parameter): a missing entry is a zero delta.
    The sum runs in float64 and is cast back to the parameter's dtype.

    Args:
        items: ``(delta, weight)`` pairs; weights finite and >= 0 (e.g. sample counts) with a
            positive sum.

    Returns:
        The averaged delta.

    Raises:
        ConfigError: No inputs, a bad weight, or a parameter whose shape or dtype differs
            between inputs.
        IntegrityError: An input delta is corrupt.
    """
    items = list(items)
    if not items:
        raise ConfigError("average_deltas: got no deltas")
    weights = [float(w) for _, w in items]
    total = math.fsum(weights)
    if not all(math.isfinite(w) and w >= 0 for w in weights) or total <= 0:
        raise ConfigError(
            f"average_deltas: weights {weights} must be finite and >= 0 with a positive sum"
        )
    for delta, _ in items:
        delta.validate()
    names = list(dict.fromkeys(n for delta, _ in items for n in delta.entries))
    entries = {}
    for name in names:
        present = [(d.entries[name], w) for d, w in items if name in d.entries]
        kinds = {(e.shape, e.values.dtype) for e, _ in present}
        if len(kinds) > 1:
            raise ConfigError(
                f"average_deltas: {name} has different shapes/dtypes: {sorted(map(str, kinds))}"
            )
        union = torch.unique(torch.cat([e.indices for e, _ in present]))  # (u,) sorted
        acc = torch.zeros(union.numel(), dtype=torch.float64)  # (u,)
        for e, w in present:
            pos = torch.searchsorted(union, e.indices)  # (nnz,) positions in the union
            acc.index_add_(0, pos, e.values.double() * w)  # (u,)
        values = (acc / total).to(present[0][0].values.dtype)  # (u,)
        entries[name] = DeltaEntry(union, values, present[0][0].shape)
    return SparseDelta(entries)


def _entry_problems(name: str, e: DeltaEntry) -> list[str]:
    """Every structural problem of one entry, each naming the parameter."""
    idx, val = e.indices, e.values
    if not isinstance(idx, Tensor) or idx.dtype != torch.int64 or idx.dim() != 1:
        return [f"{name}: indices must be a 1-D int64 tensor"]
    if not isinstance(val, Tensor) or not val.is_floating_point() or val.dim() != 1:
        return [f"{name}: values must be a 1-D floating tensor"]
    if any(not isinstance(d, int) or d < 0 for d in e.shape):
        return [f"{name}: shape {e.shape} is not a tuple of non-negative ints"]
    problems = []
    if idx.numel() != val.numel():
        problems.append(f"{name}: {idx.numel()} indices but {val.numel()} values")
    numel = math.prod(e.shape)
    out = idx[(idx < 0) | (idx >= numel)]
    if out.numel():
        problems.append(
            f"{name}: index {int(out[0])} is out of range [0, {numel}) for shape {e.shape}"
        )
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        problems.append(f"{name}: indices are not strictly increasing (sorted, unique)")
    nonfinite = int((~torch.isfinite(val)).sum())
    if nonfinite:
        problems.append(f"{name}: {nonfinite} values are NaN or infinite")
    return problems


def _check_fits(module: nn.Module, delta: SparseDelta) -> None:
    """Refuse a delta whose parameters are missing from ``module`` or differ in shape/dtype."""
    problems = []
    for name, e in delta.entries.items():
        try:
            param = module.get_parameter(name)
        except AttributeError:
            problems.append(
                f"{name}: no such plain parameter in the module (apply deltas to a fresh, "
                "unwrapped copy of the base model)"
            )
            continue
        if tuple(param.shape) != tuple(e.shape):
            problems.append(
                f"{name}: delta shape {tuple(e.shape)} does not match the parameter's "
                f"{tuple(param.shape)}"
            )
        elif param.dtype != e.values.dtype:
            problems.append(
                f"{name}: delta dtype {e.values.dtype} does not match the parameter's "
                f"{param.dtype}; load the base model in {e.values.dtype}"
            )
    if problems:
        raise ConfigError(problems)


def _check_indices(module: nn.Module, indices: dict[str, Tensor]) -> None:
    """Refuse unknown or shared parameter names and malformed index vectors."""
    owners: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    problems = []
    for name, idx in indices.items():
        try:
            param = module.get_parameter(name)
        except AttributeError:
            problems.append(f"spf: {name!r} is not a plain parameter of the module")
            continue
        if owners[id(param)] > 1:
            problems.append(f"spf: {name} is shared with another module (tied); cannot wrap it")
            continue
        if not isinstance(idx, Tensor):
            problems.append(f"spf: {name}: indices must be a 1-D int64 tensor")
            continue
        values = torch.zeros(idx.numel(), dtype=param.dtype)  # (nnz,) placeholder
        entry = DeltaEntry(idx, values, tuple(param.shape))
        problems += [f"spf: {p}" for p in _entry_problems(name, entry)]
    if problems:
        raise ConfigError(problems)


def _from_tensors(path: str, metadata: dict[str, str], tensors: dict[str, Tensor]) -> SparseDelta:
    """Rebuild and validate a delta from a file's metadata and tensors."""
    if metadata.get("format") != DELTA_FORMAT:
        raise IntegrityError(
            f"{path}: not an SPF delta (metadata format={metadata.get('format')!r})"
        )
    if metadata.get("format_version") != DELTA_FORMAT_VERSION:
        raise IntegrityError(
            f"{path}: SPF delta format version {metadata.get('format_version')!r} is not "
            f"supported; accepted: {DELTA_FORMAT_VERSION}"
        )
    try:
        shapes = json.loads(metadata["shapes"])
        dtypes = json.loads(metadata["dtypes"])
    except (KeyError, ValueError) as err:
        raise IntegrityError(f"{path}: SPF delta metadata is unreadable ({err!r})") from None
    if not isinstance(shapes, dict) or not isinstance(dtypes, dict):
        raise IntegrityError(f"{path}: SPF delta metadata 'shapes'/'dtypes' must be mappings")
    problems = []
    expected = {f"{n}.{part}" for n in shapes for part in ("indices", "values")}
    for key in sorted(set(tensors) - expected):
        problems.append(f"{key.rpartition('.')[0]}: tensor {key!r} has no entry in the metadata")
    for key in sorted(expected - set(tensors)):
        problems.append(f"{key.rpartition('.')[0]}: tensor {key!r} is missing")
    if problems:
        raise IntegrityError(f"{path}: " + "; ".join(problems))
    entries = {}
    for name, shape in shapes.items():
        if not isinstance(shape, list):
            problems.append(f"{name}: metadata shape {shape!r} is not a list of ints")
            continue
        values = tensors[f"{name}.values"]
        if dtypes.get(name) != _dtype_name(values.dtype):
            problems.append(f"{name}: values are {values.dtype}, metadata says {dtypes.get(name)}")
        entries[name] = DeltaEntry(tensors[f"{name}.indices"], values, tuple(shape))
        problems += _entry_problems(name, entries[name])
    if problems:
        raise IntegrityError(f"{path}: " + "; ".join(problems))
    return SparseDelta(entries)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
