"""An experiment's results: one record per cell, mean ± std per (dataset, row), one table.

The table is written three ways into the experiment folder: ``results.json`` (everything),
``results.csv`` (summary rows, then one row per cell) and ``results.md`` (for people).

Metrics of a cell, from its run folder's ``summary.json``:

- ``accuracy``, ``macro_f1``: the final test metrics (``macro_f1_scope``: ``whole`` when
  macro-F1 was scored on the whole test split, ``clients-mean`` for a federated run that scored
  it as the sample-weighted mean of its clients' on their test shares: runs from before the
  server summed the shares' confusion matrices, or with ``federated.eval_confusion: false``);
- ``train_time_s``: the run's own training time (the optimisation steps for local and split
  modes, the whole federation for the FedAvg modes);
- ``wall_s``: the whole cell as the runner timed it (loading, training, evaluation, saving);
- ``bytes_sent``: what crossed between processes, both directions: the split wire
  (``wire_bytes_sent`` + ``wire_bytes_received``), the Flower messages of a federated run
  (per-round bytes × clients × rounds), or for one ``shielded`` party the masked operands to and
  from its accelerator; none for ``local`` and ``plain-split`` (one process, nothing sent).
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shieldtune.errors import ExitCode, ShieldtuneError, exit_code_for
from shieldtune.experiments.config import Cell, ExperimentPlan
from shieldtune.report.tables import (
    METRICS,
    REFERENCE_NOTE,
    cells_table,
    comparison_note,
    comparison_table,
    markdown_table,
    reference_table,
    scope_note,
    summary_table,
)

__all__ = [
    "RESULTS_JSON",
    "RESULTS_CSV",
    "RESULTS_MD",
    "bytes_sent",
    "ok_record",
    "failed_record",
    "pending_record",
    "summarise",
    "compare",
    "majority_references",
    "write_results",
    "write_atomic",
]

RESULTS_JSON, RESULTS_CSV, RESULTS_MD = "results.json", "results.csv", "results.md"

Record = dict[str, Any]


def bytes_sent(summary: dict[str, Any]) -> tuple[int | None, str | None]:
    """Bytes that crossed between the run's processes, and where the figure comes from.

    Args:
        summary: A run folder's ``summary.json``.

    Returns:
        ``(bytes, source)``, or ``(None, None)`` when the mode sends nothing / reports nothing.
    """
    if "wire_bytes_sent" in summary:
        total = int(summary["wire_bytes_sent"]) + int(summary.get("wire_bytes_received", 0))
        return total, "split wire, both directions"
    if "bytes_to_client_per_round" in summary:
        per_round = int(summary["bytes_to_client_per_round"]) + int(
            summary.get("bytes_to_server_per_round", 0)
        )
        rounds = int(summary.get("rounds", 1)) - int(summary.get("resumed_after_round", 0))
        clients = int(summary.get("clients", 1))
        return per_round * clients * rounds, "Flower messages, both directions"
    if "offload_bytes_sent" in summary:
        total = int(summary["offload_bytes_sent"]) + int(summary.get("offload_bytes_received", 0))
        return total, "masked operands to and from the accelerator"
    return None, None


def write_atomic(file: Path, text: str) -> None:
    """Replace ``file`` with ``text`` in one step: a reader sees the old or the new file whole."""
    part = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    part.write_text(text)
    os.replace(part, file)


def _base_record(cell: Cell, status: str) -> Record:
    cfg = cell.config
    front = cfg.split.front_adapter if cfg.mode in ("plain-split", "split") else None
    return {
        "dataset": cell.dataset,
        "row": cell.row,
        "seed": cell.seed,
        "name": cell.name,
        "status": status,
        "reused": False,
        "mode": cfg.mode,
        "method": cfg.adapter["method"],
        "front_method": front["method"] if front else None,
        "run_dir": None,
        "error": None,
        **{k: None for k in METRICS},
    }


def ok_record(cell: Cell, summary: dict[str, Any], wall_s: float | None, reused: bool) -> Record:
    """The record of a completed cell.

    Args:
        cell: The cell.
        summary: Its run folder's ``summary.json``.
        wall_s: The runner's timing of the cell (None when unknown).
        reused: It completed in an earlier invocation (resume).
    """
    sent, source = bytes_sent(summary)
    return {
        **_base_record(cell, "ok"),
        "reused": reused,
        "run_dir": f"runs/{cell.name}",
        "accuracy": summary.get("accuracy"),
        "macro_f1": summary.get("macro_f1"),
        "macro_f1_scope": macro_f1_scope(summary),
        "train_time_s": summary.get("train_time_s"),
        "wall_s": None if wall_s is None else round(wall_s, 3),
        "bytes_sent": sent,
        "bytes_source": source,
        "steps": summary.get("steps"),
    }


def macro_f1_scope(summary: dict[str, Any]) -> str:
    """``clients-mean`` for a run of several federated clients without ``macro_f1_client_mean``
    (its macro-F1 is that mean), else ``whole`` (the whole test split's; one client's share is
    the whole split)."""
    clients = summary.get("clients")
    federated = isinstance(clients, int) and clients > 1
    return "clients-mean" if federated and "macro_f1_client_mean" not in summary else "whole"


def failed_record(cell: Cell, error: BaseException, wall_s: float) -> Record:
    """The record of a cell whose run raised ``error`` (with the CLI's exit code for it)."""
    code = exit_code_for(error) if isinstance(error, ShieldtuneError) else ExitCode.UNEXPECTED
    return {
        **_base_record(cell, "failed"),
        "error": f"{type(error).__name__}: {error}",
        "exit_code": int(code),
        "wall_s": round(wall_s, 3),
    }


def pending_record(cell: Cell) -> Record:
    """The record of a cell not run yet (an interrupted or still running experiment)."""
    return _base_record(cell, "pending")


def _stat(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1; None below two values)."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def summarise(records: Sequence[Record]) -> list[Record]:
    """Mean ± std over seeds per (dataset, row), in the records' order.

    Only completed cells count; a metric a cell lacks is left out of that metric's mean.
    ``macro_f1_scope`` is the completed cells' common scope (``whole`` / ``clients-mean``),
    ``mixed`` when they differ, None without any.
    """
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["row"]), []).append(r)
    out = []
    for (dataset, row), cells in groups.items():
        ok = [c for c in cells if c["status"] == "ok"]
        first = cells[0]
        entry: Record = {
            "dataset": dataset,
            "row": row,
            "mode": first["mode"],
            "method": first["method"],
            "front_method": first["front_method"],
            "seeds": [c["seed"] for c in cells],
            "n_ok": len(ok),
            "n_failed": sum(c["status"] == "failed" for c in cells),
        }
        for key in METRICS:
            entry[key] = _stat([float(c[key]) for c in ok if c.get(key) is not None])
        scopes = {c["macro_f1_scope"] for c in ok if c.get("macro_f1") is not None}
        entry["macro_f1_scope"] = scopes.pop() if len(scopes) == 1 else "mixed" if scopes else None
        out.append(entry)
    return out


def compare(summary: Sequence[Record], baselines: dict[str, str]) -> list[Record]:
    """Each row with a baseline against that baseline, per dataset (means over seeds).

    Args:
        summary: What :func:`summarise` returned.
        baselines: Row name -> its baseline row's name.

    Returns:
        ``accuracy_delta_points`` / ``macro_f1_delta_points`` (row − baseline, × 100) and
        ``train_time_ratio`` / ``wall_ratio`` / ``bytes_ratio`` (row ÷ baseline); None where a
        side has no value. The macro-F1 Δ is None too unless both rows' macro-F1 has one and
        the same scope (both the whole test split's, or both the clients' mean): a whole
        split's macro-F1 against a mean of per-share ones measures the scoring, not the method.
    """
    means = {(s["dataset"], s["row"]): s for s in summary}
    out = []
    for s in summary:
        base_row = baselines.get(s["row"])
        base = means.get((s["dataset"], base_row)) if base_row else None
        if base is None:
            continue
        out.append(
            {
                "dataset": s["dataset"],
                "row": s["row"],
                "baseline": base_row,
                "accuracy_delta_points": _delta(s, base, "accuracy"),
                "macro_f1_delta_points": (
                    _delta(s, base, "macro_f1") if _same_scope(s, base) else None
                ),
                "train_time_ratio": _ratio(s, base, "train_time_s"),
                "wall_ratio": _ratio(s, base, "wall_s"),
                "bytes_ratio": _ratio(s, base, "bytes_sent"),
            }
        )
    return out


def majority_references(plan: ExperimentPlan) -> list[Record]:
    """Per dataset, what predicting the majority class scores on the cells' test split.

    The reference classifier answers every test row with the most frequent label of the training
    split (the lowest label id on a tie): the accuracy and macro-F1 a model reaches without
    learning anything from the text. A row at this accuracy and macro-F1 predicts one class.
    The data is read and split as the recipes read it (the cells' ``data`` settings); nothing is
    run. A dataset whose data cannot be read here (``--collect`` on a machine without it), or
    whose rows split it differently, gets an ``error`` instead of figures.
    """
    from shieldtune.data.metrics import accuracy, macro_f1
    from shieldtune.recipes._common import load_splits  # imports torch: only when tabling

    by_dataset: dict[str, list[Cell]] = {}
    for cell in plan.cells:
        by_dataset.setdefault(cell.dataset, []).append(cell)
    out: list[Record] = []
    for dataset, cells in by_dataset.items():
        split = cells[0].config.data.model_dump(exclude={"max_length"})
        if any(c.config.data.model_dump(exclude={"max_length"}) != split for c in cells[1:]):
            out.append({"dataset": dataset, "error": "its rows read or split the data differently"})
            continue
        try:
            ds, train, test = load_splits(cells[0].config)
        except ShieldtuneError as err:
            out.append({"dataset": dataset, "error": str(err)})
            continue
        counts = [0] * ds.num_labels
        for label in train.labels():
            counts[label] += 1
        majority = counts.index(max(counts))
        truth = test.labels()
        guess = [majority] * len(truth)
        out.append(
            {
                "dataset": dataset,
                "test_rows": len(truth),
                "majority_label": ds.label_names[majority],
                "accuracy": accuracy(guess, truth),
                "macro_f1": macro_f1(guess, truth, ds.num_labels),
            }
        )
    return out


def _delta(row: Record, base: Record, key: str) -> float | None:
    """(row − baseline) × 100 of two means (percentage points)."""
    a, b = row[key]["mean"], base[key]["mean"]
    return None if a is None or b is None else 100.0 * (a - b)


def _same_scope(row: Record, base: Record) -> bool:
    """Both rows' macro-F1 has one and the same scope."""
    return row["macro_f1_scope"] == base["macro_f1_scope"] != "mixed"


def _ratio(row: Record, base: Record, key: str) -> float | None:
    """row ÷ baseline of two means."""
    a, b = row[key]["mean"], base[key]["mean"]
    return None if a is None or not b else a / b


_CSV_FIELDS = [
    "kind",
    "dataset",
    "row",
    "mode",
    "method",
    "front_method",
    "seed",
    "status",
    "n",
    *(f for k in METRICS for f in (k, f"{k}_std")),
    "bytes_source",
    "run_dir",
    "error",
]


def _csv(summary: Sequence[Record], records: Sequence[Record]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for s in summary:
        row = {k: s.get(k) for k in ("dataset", "row", "mode", "method", "front_method")}
        row.update(kind="summary", seed="", status=f"{s['n_ok']} ok", n=s["n_ok"])
        for key in METRICS:
            row[key], row[f"{key}_std"] = s[key]["mean"], s[key]["std"]
        writer.writerow(row)
    for r in records:
        writer.writerow({**r, "kind": "cell", "n": 1 if r["status"] == "ok" else 0})
    return buf.getvalue()


def _markdown(name: str, status: Record, summary, comparisons, references, records) -> str:
    parts = [
        f"# Results: {name}",
        "",
        f"{status['ok']} of {status['cells']} cells completed, {status['failed']} failed, "
        f"{status['pending']} not run. Mean ± sample standard deviation over the completed "
        "seeds; train s = the run's training time, wall s = the whole cell; bytes sent = what "
        "crossed between the run's processes (– for single-process modes).",
        "",
        markdown_table(*summary_table(summary)),
    ]
    note = scope_note(records)
    if note:
        parts += ["", note]
    if comparisons:
        parts += [
            "",
            "## Against the baseline rows",
            "",
            markdown_table(*comparison_table(comparisons)),
        ]
        why = comparison_note(comparisons)
        if why:
            parts += ["", why]
    if references:
        parts += [
            "",
            "## Reference: the majority class",
            "",
            REFERENCE_NOTE,
            "",
            markdown_table(*reference_table(references)),
        ]
    parts += ["", "## Cells", "", markdown_table(*cells_table(records)), ""]
    return "\n".join(parts)


def write_results(
    plan: ExperimentPlan,
    records: Sequence[Record],
    references: Sequence[Record] | None = None,
) -> dict[str, Any]:
    """Write ``results.json``, ``results.csv`` and ``results.md`` into the experiment folder.

    Args:
        plan: The experiment.
        records: One record per cell (ok, failed or pending), in the plan's order.
        references: :func:`majority_references` of the plan (they depend on the plan only:
            a caller writing the table after every cell computes them once); None: computed.

    Returns:
        What ``results.json`` holds.
    """
    summary = summarise(records)
    baselines = {r.name: r.baseline for r in plan.config.rows if r.baseline}
    comparisons = compare(summary, baselines)
    references = list(majority_references(plan) if references is None else references)
    status = {
        "cells": len(records),
        **{s: sum(r["status"] == s for r in records) for s in ("ok", "failed", "pending")},
    }
    results = {
        "experiment": plan.config.name,
        "status": status,
        "seeds": list(plan.config.seeds),
        "metrics": dict(METRICS),
        "summary": summary,
        "comparisons": comparisons,
        "references": references,
        "cells": list(records),
    }
    out = Path(plan.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / RESULTS_JSON, json.dumps(results, indent=1))
    write_atomic(out / RESULTS_CSV, _csv(summary, records))
    write_atomic(
        out / RESULTS_MD,
        _markdown(plan.config.name, status, summary, comparisons, references, records),
    )
    return results
