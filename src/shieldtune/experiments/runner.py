"""Run an experiment's grid: every cell through its mode's recipe, one results table.

Each cell runs through ``shieldtune.recipes.RECIPES[mode]``, the code ``shieldtune train`` runs,
and writes its run folder under ``<output_dir>/runs/<cell>``. The experiment folder holds:

- ``experiment.yaml``: the experiment config, its base run config read in;
- ``provenance.json``: machine, Python, package versions, seeds, data attribution, one entry
  per invocation;
- ``cells/<cell>.json``: each cell's record (``cells/<cell>.traceback.txt`` for a failed one);
- ``results.json`` / ``results.csv`` / ``results.md``: the table, rewritten after every cell,
  so an interrupted experiment leaves a table of what it finished (the rest ``pending``).

A failed cell is recorded with its error and the grid goes on. Running the same experiment
again resumes it: a cell whose run folder completed (it has ``summary.json``; the recipes write
a run folder under a ``.partial-`` name and rename it only when the run completes) is read, not
run again, provided it ran the same config; failed and missing cells run. With ``run=False``
(``shieldtune experiment --collect``) nothing runs: the table is written from the cells that
completed (in this folder, or copied into ``runs/`` from another machine or from an experiment
over a subset of the seeds or datasets), the others stay ``pending``.

``only`` (``--seed`` / ``--dataset`` / ``--row``) runs a subset of the cells and tables them
all, the others read from disk where they completed. Several invocations may work on one folder
at once (on one machine, or on machines sharing it): a cell runs under an exclusive lock
(``.locks/<cell>.lock``), so an invocation that reaches a cell another one is running leaves it
to that one (``pending`` here, ``elsewhere: true``) and goes on; the table is rewritten after
every cell from what is on disk, so the last invocation to finish tables everything;
``provenance.json`` is updated under its own lock, one entry per invocation.
"""

from __future__ import annotations

import fcntl
import json
import time
import traceback
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import yaml

from shieldtune.config import load_config
from shieldtune.errors import ConfigError
from shieldtune.experiments.config import Cell, ExperimentPlan
from shieldtune.experiments.provenance import PROVENANCE_JSON, provenance
from shieldtune.experiments.results import (
    Record,
    failed_record,
    majority_references,
    ok_record,
    pending_record,
    write_atomic,
    write_results,
)

__all__ = [
    "EXPERIMENT_YAML",
    "CELLS_DIR",
    "LOCKS_DIR",
    "Progress",
    "run_experiment",
    "check_resumable",
]

EXPERIMENT_YAML = "experiment.yaml"
CELLS_DIR = "cells"
LOCKS_DIR = ".locks"

Progress = Callable[[Cell], AbstractContextManager[Callable[[dict[str, Any]], None] | None]]
"""Gives each cell a context whose value is the recipe's ``on_progress`` callback (or None)."""


class _PlainDumper(yaml.SafeDumper):
    """Writes shared values out in full (no ``&id001`` anchors)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


@contextmanager
def _no_progress(cell: Cell) -> Iterator[None]:
    yield None


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two config mappings differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def check_resumable(plan: ExperimentPlan) -> None:
    """Refuse to resume over completed cells that ran another config.

    A saved config is read through the current schema, so a field added since the cell ran
    compares as its default (the cell is reused if it ran that default).

    Raises:
        ConfigError: One line per such cell, naming the fields that differ.
    """
    problems = []
    for cell in plan.cells:
        saved = cell.run_dir / "config.yaml"
        if not (cell.run_dir / "summary.json").is_file() or not saved.is_file():
            continue
        try:
            before = load_config(saved).model_dump(mode="json")
        except ConfigError as err:
            problems.append(
                f"cell {cell.name}: the config.yaml of its completed run folder "
                f"{cell.run_dir} is no longer a valid config ({err.problems[0]}); "
                "delete that folder or use another output_dir"
            )
            continue
        now = cell.config.model_dump(mode="json")
        for key in ("output_dir", "run_name"):  # where the folder is, not what it ran
            before.pop(key, None)
            now.pop(key, None)
        diff = _differences(before, now)
        if diff:
            problems.append(
                f"cell {cell.name}: its completed run folder {cell.run_dir} ran another config "
                f"(differs in {', '.join(diff)}); delete that folder or use another output_dir"
            )
    if problems:
        raise ConfigError(problems)


def _earlier_wall(out: Path, cell: Cell) -> float | None:
    try:
        return json.loads((out / CELLS_DIR / f"{cell.name}.json").read_text()).get("wall_s")
    except (OSError, ValueError):
        return None


@contextmanager
def _lock(file: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``file`` (created if missing) for the block.

    Yields:
        True when held; False (without ``wait``) when another process holds it.
    """
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _completed(cell: Cell, out: Path) -> Record | None:
    """The record of a cell whose run folder completed (in any invocation), else None."""
    done = cell.run_dir / "summary.json"
    if not done.is_file():
        return None
    return ok_record(cell, json.loads(done.read_text()), _earlier_wall(out, cell), True)


def _run_cell(cell: Cell, out: Path, progress: Progress, run: bool = True) -> Record:
    """One cell: read it if its run folder completed earlier, else run its recipe (if ``run``
    and no other invocation is running it)."""
    from shieldtune.recipes import RECIPES

    record = _completed(cell, out)
    if record is not None or not run:
        return record or pending_record(cell)
    with _lock(out / LOCKS_DIR / f"{cell.name}.lock", wait=False) as mine:
        if not mine:
            return {**pending_record(cell), "elsewhere": True}
        record = _completed(cell, out)  # another invocation may have finished it just now
        if record is not None:
            return record
        started = time.perf_counter()
        try:
            with progress(cell) as update:
                run_dir = RECIPES[cell.config.mode](cell.config, on_progress=update)
        except Exception as err:  # the grid goes on; the record keeps the error
            record = failed_record(cell, err, time.perf_counter() - started)
            trace = "".join(traceback.format_exception(err))
            (out / CELLS_DIR / f"{cell.name}.traceback.txt").write_text(trace)
        else:
            summary = json.loads((Path(run_dir) / "summary.json").read_text())
            record = ok_record(cell, summary, time.perf_counter() - started, False)
        write_atomic(out / CELLS_DIR / f"{cell.name}.json", json.dumps(record, indent=1))
    return record


def _save_invocation(out: Path, entry: dict[str, Any]) -> None:
    """Record this invocation in ``provenance.json``: its entry (by ``entry["invocation"]``)
    replaced or appended, every other invocation's kept."""
    file = out / PROVENANCE_JSON
    with _lock(out / LOCKS_DIR / f"{PROVENANCE_JSON}.lock"):
        try:
            invocations = json.loads(file.read_text())["invocations"]
            invocations = [e for e in invocations if isinstance(e, dict)]
        except (OSError, ValueError, KeyError, TypeError):
            invocations = []
        ids = [e.get("invocation") for e in invocations]
        if entry["invocation"] in ids:
            invocations[ids.index(entry["invocation"])] = entry
        else:
            invocations.append(entry)
        write_atomic(file, json.dumps({"invocations": invocations}, indent=1))


def run_experiment(
    plan: ExperimentPlan,
    *,
    progress: Progress | None = None,
    on_record: Callable[[int, Record], None] | None = None,
    argv: list[str] | None = None,
    run: bool = True,
    only: Collection[str] | None = None,
) -> list[Record]:
    """Run (or resume) every cell of an experiment and write its results table.

    Args:
        plan: The validated experiment (:func:`~shieldtune.experiments.load_experiment`).
        progress: Gives each cell its progress callback (e.g. a progress bar).
        on_record: Called with ``(index, record)`` after each cell.
        argv: The command line, recorded in ``provenance.json`` (default: ``sys.argv``).
        run: False: run no cell, only write the table of the completed ones (``--collect``).
        only: Names of the cells to run (:meth:`ExperimentPlan.select`); the others are only
            read. None: every cell.

    Returns:
        One record per cell, ``status`` ``ok`` or ``failed`` (or ``pending`` when not run, or
        run by another invocation: ``elsewhere``), in the plan's order.

    Raises:
        ConfigError: A completed cell ran another config (nothing is run then).
        KeyboardInterrupt: Stops the grid; the table written so far stays, the interrupted
            cell's folder stays ``.partial-*``, and running again resumes.
    """
    check_resumable(plan)
    out = plan.output_dir
    (out / CELLS_DIR).mkdir(parents=True, exist_ok=True)
    write_atomic(
        out / EXPERIMENT_YAML,
        yaml.dump(plan.resolved(), Dumper=_PlainDumper, sort_keys=False, allow_unicode=True),
    )
    entry = {
        "invocation": uuid.uuid4().hex[:16],
        **provenance(plan, argv),
        **({} if only is None else {"only": sorted(only)}),
        "ran": [],
        **({} if run else {"collect": True}),
    }
    _save_invocation(out, entry)
    records = [pending_record(c) for c in plan.cells]
    references = majority_references(plan)  # the data read once, not after every cell
    write_results(plan, records, references)
    for i, cell in enumerate(plan.cells):
        selected = run and (only is None or cell.name in only)
        records[i] = _run_cell(cell, out, progress or _no_progress, selected)
        if records[i]["status"] != "pending" and not records[i]["reused"]:
            entry["ran"].append(cell.name)
            _save_invocation(out, entry)
        for j, other in enumerate(plan.cells):  # cells other invocations completed meanwhile
            if j != i and records[j]["status"] == "pending":
                records[j] = _completed(other, out) or records[j]
        write_results(plan, records, references)
        if on_record is not None:
            on_record(i, records[i])
    return records
