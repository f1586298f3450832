"""Experiment config: a grid of datasets × rows × seeds over one base run config.

Validated once, at the edge: unknown keys are refused, and every cell's run config is built
and validated before anything runs, so a typo in the last row fails in a second, not after
hours of training. Every problem is reported in one :class:`ConfigError`.

A cell's run config is built in this order (later wins):

1. ``base``: a run config (an inline mapping, or a YAML file relative to the experiment file);
2. ``data.dataset`` = the dataset's name, then the dataset's ``overrides`` (which may set
   ``data.dataset`` themselves, e.g. to ``table``);
3. the row's ``overrides``;
4. the command line's ``--set key.path=value`` overrides;
5. ``train.seed`` = the cell's seed, ``output_dir`` = ``<output_dir>/runs``, ``run_name`` = the
   cell's name.

Overrides are mappings whose keys may be dotted paths (``train.epochs: 1``) or nested sections
(``train: {epochs: 1}``); nested sections merge into the base, except the adapter specs
(``adapter``, ``split.front_adapter``), which an override replaces whole, so switching a row
from LoRA to P-tuning v2 does not inherit LoRA's ``rank``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shieldtune.config import RunConfig, apply_overrides, validate
from shieldtune.data.builtin import BUILTIN_DATASETS
from shieldtune.errors import ConfigError

__all__ = [
    "DatasetSpec",
    "RowSpec",
    "ExperimentConfig",
    "Cell",
    "ExperimentPlan",
    "load_experiment",
    "plan_experiment",
    "merge_overrides",
    "slug",
]

KNOWN_DATASETS = (*BUILTIN_DATASETS, "table")
"""Accepted ``data.dataset`` values (checked here, before any data is read)."""

REPLACED_WHOLE = frozenset({"adapter", "front_adapter"})
"""Override keys whose mapping replaces the base's instead of merging into it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Strict):
    """One dataset of the grid."""

    name: str = Field(min_length=1, description="label in the table; data.dataset by default")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="run-config overrides for this dataset"
    )


class RowSpec(_Strict):
    """One row of the results table: a method, as overrides of the base run config."""

    name: str = Field(min_length=1, description="row label in the table, e.g. 'local LoRA'")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="run-config overrides, e.g. {mode: split, adapter: …}"
    )
    baseline: str | None = Field(
        None, description="another row's name: the table gives Δ accuracy and time ratios to it"
    )


class ExperimentConfig(_Strict):
    """A grid of datasets × rows × seeds over one base run config."""

    name: str = Field("experiment", min_length=1, description="the experiment's name")
    base: str | dict[str, Any] = Field(
        default_factory=dict,
        description="run config: inline mapping, or a YAML file relative to the experiment file",
    )
    datasets: list[str | DatasetSpec] = Field(min_length=1, description="datasets of the grid")
    rows: list[RowSpec] = Field(min_length=1, description="methods of the grid (table rows)")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="train.seed")
    output_dir: str = Field(min_length=1, description="experiment folder (runs/ and the tables)")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if any(s < 0 for s in value) or len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct and >= 0 (got {value})")
        return value

    def dataset_specs(self) -> list[DatasetSpec]:
        """The datasets, a bare name read as ``{name: NAME}``."""
        return [d if isinstance(d, DatasetSpec) else DatasetSpec(name=d) for d in self.datasets]


@dataclass(frozen=True)
class Cell:
    """One run of the grid.

    Attributes:
        dataset: The dataset's name (table label).
        row: The row's name (table label).
        seed: Its ``train.seed``.
        name: Its run folder's name, ``<dataset>__<row>__seed<k>`` as slugs.
        config: Its validated run config.
    """

    dataset: str
    row: str
    seed: int
    name: str
    config: RunConfig

    @property
    def run_dir(self) -> Path:
        """Where the completed run folder is (or will be)."""
        return Path(self.config.output_dir) / self.name


@dataclass(frozen=True)
class ExperimentPlan:
    """A validated experiment: its config, the base it resolved and every cell.

    Attributes:
        config: The experiment config (as given).
        base: The base run config as a mapping (a ``base`` file read in).
        overrides: The command line's ``--set`` overrides (applied to every cell).
        cells: Every cell, datasets outermost, then rows, then seeds.
        output_dir: The experiment folder.
        source: The experiment file (None for an in-memory config).
    """

    config: ExperimentConfig
    base: dict[str, Any]
    overrides: tuple[str, ...]
    cells: tuple[Cell, ...]
    output_dir: Path
    source: Path | None = None

    def select(
        self,
        *,
        seeds: Sequence[int] = (),
        datasets: Sequence[str] = (),
        rows: Sequence[str] = (),
    ) -> frozenset[str]:
        """The names of the cells with one of ``seeds``, one of ``datasets`` and one of ``rows``
        (an empty filter takes them all): what ``shieldtune experiment --seed/--dataset/--row``
        runs.

        Raises:
            ConfigError: One line per value the experiment does not have, naming its values.
        """
        have = {
            "seed": [c.seed for c in self.cells],
            "dataset": [c.dataset for c in self.cells],
            "row": [c.row for c in self.cells],
        }
        wanted: dict[str, Sequence[Any]] = {"seed": seeds, "dataset": datasets, "row": rows}
        problems = [
            f"--{key} {value!r}: the experiment has no such {key}; its {key}s: "
            + ", ".join(repr(v) for v in dict.fromkeys(have[key]))
            for key, values in wanted.items()
            for value in values
            if value not in have[key]
        ]
        if problems:
            raise ConfigError(problems)
        return frozenset(
            c.name
            for c in self.cells
            if all(not wanted[k] or getattr(c, k) in wanted[k] for k in wanted)
        )

    def resolved(self) -> dict[str, Any]:
        """The experiment config with its base read in (what ``experiment.yaml`` records)."""
        data = self.config.model_dump(mode="json")
        data["base"] = copy.deepcopy(self.base)
        data["output_dir"] = str(self.output_dir)
        if self.overrides:
            data["command_line_overrides"] = list(self.overrides)
        return data


def slug(text: str) -> str:
    """A folder-safe form of a label: lower case, runs of other characters as ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply a mapping of overrides to a run-config mapping (see the module docstring).

    Args:
        base: The run config so far (not modified).
        overrides: Keys are dotted paths or sections; values replace, sections merge.

    Returns:
        A new mapping.

    Raises:
        ConfigError: A dotted path runs through a value that is not a section.
    """
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        *parents, leaf = str(key).split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part} is not a section")
            node = child
        if (
            isinstance(value, dict)
            and isinstance(node.get(leaf), dict)
            and leaf not in REPLACED_WHOLE
        ):
            node[leaf] = merge_overrides(node[leaf], value)
        else:
            node[leaf] = copy.deepcopy(value)
    return out


def _problems(err: ValidationError, where: str) -> list[str]:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        got = "" if e["type"] == "missing" else f" (got {e['input']!r})"
        lines.append(f"{where}{field}: {e['msg']}{got}")
    return lines


def _read_yaml(file: Path, what: str) -> dict[str, Any]:
    if not file.is_file():
        raise ConfigError(f"{what} {file} does not exist")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {file} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {file} must hold a mapping at the top level")
    return data


def _base(config: ExperimentConfig, folder: Path) -> dict[str, Any]:
    if isinstance(config.base, dict):
        return copy.deepcopy(config.base)
    path = Path(config.base)
    return _read_yaml(path if path.is_absolute() else folder / path, "base: run config")


def _check_names(config: ExperimentConfig, datasets: list[DatasetSpec]) -> list[str]:
    problems = []
    for what, names in (
        ("rows", [r.name for r in config.rows]),
        ("datasets", [d.name for d in datasets]),
    ):
        slugs = [slug(n) for n in names]
        for n, s in zip(names, slugs, strict=True):
            if slugs.count(s) > 1:
                problems.append(f"{what}: name {n!r} is not unique (folder name {s!r})")
    rows = {r.name for r in config.rows}
    for r in config.rows:
        if r.baseline is not None and (r.baseline not in rows or r.baseline == r.name):
            problems.append(
                f"rows: {r.name!r} has baseline {r.baseline!r}; accepted: another row's name "
                f"({', '.join(sorted(rows - {r.name}))})"
            )
    return sorted(set(problems), key=problems.index)


def plan_experiment(
    config: ExperimentConfig,
    *,
    folder: Path | str = ".",
    overrides: list[str] | tuple[str, ...] = (),
    output_dir: Path | str | None = None,
    source: Path | None = None,
) -> ExperimentPlan:
    """Build and validate every cell of an experiment.

    Args:
        config: The experiment config.
        folder: Where a relative ``base`` file is looked up (the experiment file's folder).
        overrides: ``key.path=value`` strings applied to every cell (after the row's).
        output_dir: Replaces ``config.output_dir``.
        source: The experiment file, recorded with the results.

    Returns:
        The plan.

    Raises:
        ConfigError: Every problem of every cell (unknown dataset, invalid override, ...).
    """
    base = _base(config, Path(folder))
    out = Path(output_dir if output_dir is not None else config.output_dir)
    datasets = config.dataset_specs()
    found: list[tuple[str, str, str]] = []  # (dataset, row or "", problem)
    cells: list[Cell] = []
    for d in datasets:
        for r in config.rows:
            try:
                data = _cell_data(base, d, r, overrides)
            except ConfigError as err:
                found += [(d.name, r.name, p) for p in err.problems]
                continue
            section = data.get("data")
            dataset = section.get("dataset") if isinstance(section, dict) else None
            if dataset not in KNOWN_DATASETS:
                found.append(
                    (
                        d.name,
                        "",
                        f"data.dataset: unknown dataset {dataset!r}; accepted: "
                        f"{', '.join(KNOWN_DATASETS)} (a dataset's name is its data.dataset "
                        "unless its overrides set data.dataset)",
                    )
                )
            names = [f"{slug(d.name)}__{slug(r.name)}__seed{seed}" for seed in config.seeds]
            try:
                configs = [
                    validate(merge_overrides(data, _cell_fields(seed, out, name)))
                    for seed, name in zip(config.seeds, names, strict=True)
                ]
            except ConfigError as err:
                found += [(d.name, r.name, p) for p in err.problems]
                continue
            cells += [
                Cell(d.name, r.name, seed, name, cfg)
                for seed, name, cfg in zip(config.seeds, names, configs, strict=True)
            ]
    problems = _check_names(config, datasets) + _collapse(found, [d.name for d in datasets])
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return ExperimentPlan(config, base, tuple(overrides), tuple(cells), out, source)


def _cell_data(
    base: dict[str, Any], d: DatasetSpec, r: RowSpec, overrides: list[str] | tuple[str, ...]
) -> dict[str, Any]:
    """Base, then the dataset, then the row, then the command line (see the module docstring)."""
    data = merge_overrides(base, {"data.dataset": d.name})
    data = merge_overrides(data, d.overrides)  # may set data.dataset itself
    data = merge_overrides(data, r.overrides)
    data.setdefault("adapter", {"method": "lora"})
    return apply_overrides(data, list(overrides))


def _cell_fields(seed: int, out: Path, name: str) -> dict[str, Any]:
    """What the grid sets in every cell: its seed and its run folder."""
    return {"train.seed": seed, "output_dir": str(out / "runs"), "run_name": name}


def _collapse(found: list[tuple[str, str, str]], datasets: list[str]) -> list[str]:
    """One line per problem: a row's problem once when every dataset has it."""
    seen = set(found)
    lines = []
    for dataset, row, problem in found:
        if not row:
            lines.append(f"dataset {dataset!r}: {problem}")
        elif all((d, row, problem) in seen for d in datasets):
            lines.append(f"row {row!r}: {problem}")
        else:
            lines.append(f"dataset {dataset!r} × row {row!r}: {problem}")
    return list(dict.fromkeys(lines))


def load_experiment(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    output_dir: Path | str | None = None,
) -> ExperimentPlan:
    """Read an experiment YAML file and plan it (see :func:`plan_experiment`).

    Args:
        path: The experiment file.
        overrides: ``key.path=value`` strings applied to every cell.
        output_dir: Replaces the file's ``output_dir``.

    Top-level keys starting with ``x-`` are ignored: they hold YAML anchors the rows refer to
    (``x-federated: &federated {...}``, then ``federated: *federated``).

    Returns:
        The plan, every cell validated.

    Raises:
        ConfigError: Missing or unreadable file, bad YAML, unknown keys, invalid cells.
    """
    file = Path(path)
    data = _read_yaml(file, "experiment config")
    data = {k: v for k, v in data.items() if not str(k).startswith("x-")}  # anchor holders
    try:
        config = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_problems(err, "")) from None
    return plan_experiment(
        config, folder=file.parent, overrides=overrides, output_dir=output_dir, source=file
    )
