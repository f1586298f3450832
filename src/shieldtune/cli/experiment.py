"""``shieldtune experiment CONFIG``: run a grid of datasets × rows × seeds, write one table."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from shieldtune.cli._common import console, err_console, progress_bar, quiet_libraries
from shieldtune.errors import ConfigError, ExitCode

__all__ = ["experiment_command", "EPILOG", "Selection"]

EPILOG = """Examples:

  shieldtune experiment configs/experiments/paper_minilm.yaml

  shieldtune experiment configs/experiments/tiny.yaml --output-dir runs/exp-tiny

  shieldtune experiment configs/experiments/paper_minilm.yaml --seed 1 --row "local LoRA"

  shieldtune report runs/exp-tiny

Running the same command again resumes: completed cells are read, failed and missing ones run.
--seed / --dataset / --row run a subset and table every cell (the others as they are on disk).
Invocations may share a folder (e.g. one per core): each cell runs in one of them, under a lock.
"""


class Selection(NamedTuple):
    """The command line's ``--seed`` / ``--dataset`` / ``--row`` values (empty: no filter)."""

    seeds: tuple[int, ...] = ()
    datasets: tuple[str, ...] = ()
    rows: tuple[str, ...] = ()


def experiment_command(
    config: Path,
    overrides: list[str],
    output_dir: Path | None,
    dry_run: bool = False,
    collect: bool = False,
    selection: Selection | None = None,
) -> int:
    """Validate every cell, then run (or resume) the grid.

    Args:
        config: The experiment YAML file.
        overrides: ``key.path=value`` strings applied to every cell's run config.
        output_dir: Replaces the file's ``output_dir``.
        dry_run: List the cells and stop.
        collect: Run nothing; write the table from the cells that completed (the rest pending).
        selection: Run only the cells it selects; table all of them.

    Returns:
        0 when every cell completed, else the exit code of the first failed cell's error.
    """
    from shieldtune.experiments import load_experiment, run_experiment

    plan = load_experiment(config, overrides, output_dir)  # every cell validated, at the edge
    selection = selection or Selection()
    only = plan.select(**selection._asdict()) if any(selection) else None  # None: every cell
    if collect and only is not None:
        raise ConfigError("--collect runs no cell; --seed / --dataset / --row choose cells to run")
    total = len(plan.cells)
    console.print(
        f"experiment [bold]{plan.config.name}[/]: {total} cells "
        f"({len(plan.config.dataset_specs())} datasets × {len(plan.config.rows)} rows × "
        f"{len(plan.config.seeds)} seeds) → {plan.output_dir}"
        + (f"; running the {len(only)} selected" if only is not None else ""),
        highlight=False,
        soft_wrap=True,
    )
    if dry_run:
        for cell in plan.cells:
            line = f"  {cell.name}: {cell.config.mode} · {cell.config.adapter['method']}"
            mark = "" if only is None or cell.name in only else " (not selected)"
            console.print(line + mark, highlight=False, soft_wrap=True)
        return 0
    quiet_libraries()

    @contextmanager
    def progress(cell: Any) -> Iterator[Callable[[dict[str, Any]], None]]:
        with progress_bar(f"{cell.dataset} · {cell.row} · seed {cell.seed}") as update:
            yield update

    def on_record(i: int, record: dict[str, Any]) -> None:
        head = f"[{i + 1}/{total}] {record['dataset']} · {record['row']} · seed {record['seed']}"
        if record["status"] == "pending":
            why = " (running in another invocation)" if record.get("elsewhere") else ""
            console.print(f"{head}: pending{why}", highlight=False, soft_wrap=True)
        elif record["status"] == "ok":
            acc = record.get("accuracy")
            how = "done earlier" if record["reused"] else f"{record['wall_s']:.0f} s"
            score = f"accuracy {acc:.3f}" if isinstance(acc, float) else "no accuracy"
            console.print(f"{head}: ok, {score} ({how})", highlight=False, soft_wrap=True)
        else:
            err_console.print(f"{head}: [bold red]failed[/]: {record['error']}", highlight=False)

    records = run_experiment(
        plan,
        progress=progress,
        on_record=on_record,
        argv=sys.argv,
        run=not collect,
        only=only,
    )
    failed = [r for r in records if r["status"] == "failed"]
    console.print(
        f"results: [bold]{plan.output_dir / 'results.md'}[/] (and .csv, .json)", soft_wrap=True
    )
    if failed:
        err_console.print(
            f"[bold red]{len(failed)} of {total} cells failed[/]; run the same command again to "
            "retry them (completed cells are kept)",
            highlight=False,
        )
        return int(failed[0].get("exit_code") or ExitCode.UNEXPECTED)
    return 0
