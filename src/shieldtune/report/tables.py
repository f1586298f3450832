"""Tables of an experiment's results, as Markdown and HTML (pure functions, no I/O).

The rows come from ``results.json`` (written by :mod:`shieldtune.experiments`): ``summary``
rows hold ``{"mean", "std", "n"}`` per metric, ``cells`` rows one value per metric.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

__all__ = [
    "METRICS",
    "fmt_value",
    "fmt_stat",
    "markdown_table",
    "html_table",
    "summary_table",
    "cells_table",
    "comparison_table",
    "reference_table",
    "REFERENCE_NOTE",
    "scope_note",
    "comparison_note",
]

METRICS: dict[str, str] = {
    "accuracy": "test accuracy",
    "macro_f1": "test macro-F1",
    "train_time_s": "train s",
    "wall_s": "wall s",
    "bytes_sent": "bytes sent",
}
"""Metrics of the results table: key in ``summary.json`` / ``results.json`` -> column label."""

_DIGITS = {"accuracy": 3, "macro_f1": 3, "train_time_s": 1, "wall_s": 1}


def fmt_value(key: str, value: Any) -> str:
    """One metric value as text (``–`` when absent; bytes in KiB/MiB/GiB)."""
    if value is None:
        return "–"
    if key == "bytes_sent":
        size = float(value)
        for unit in ("B", "KiB", "MiB", "GiB"):
            if size < 1024 or unit == "GiB":
                return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
            size /= 1024
    if isinstance(value, float):
        return f"{value:.{_DIGITS.get(key, 3)}f}"
    return str(value)


def fmt_stat(key: str, stat: dict[str, Any] | None) -> str:
    """``mean ± std`` (std over seeds; the mean alone for one seed; ``–`` for none)."""
    if not stat or stat.get("mean") is None:
        return "–"
    mean = fmt_value(key, float(stat["mean"]))
    if stat.get("std") is None:
        return mean
    if key == "bytes_sent":
        return f"{mean} ± {fmt_value(key, float(stat['std']))}"
    return f"{mean} ± {float(stat['std']):.{_DIGITS.get(key, 3)}f}"


def _summary_stat(key: str, stat: dict[str, Any] | None, n_ok: int) -> str:
    """``fmt_stat``, saying over how many seeds when some completed cells lack the metric
    (e.g. the wall time of a cell copied in from a run outside the experiment)."""
    n = (stat or {}).get("n") or 0
    text = fmt_stat(key, stat)
    return f"{text} ({n} of {n_ok} seeds)" if 0 < n < n_ok else text


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""
    lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |"]
    lines.append("| " + " | ".join("---" for _ in headers) + " |")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()
) -> str:
    """An HTML table (text escaped); the ``numeric`` columns are right-aligned."""

    def cls(i: int) -> str:
        return ' class="num"' if i in numeric else ""

    head = "".join(f"<th{cls(i)}>{html.escape(h)}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{html.escape(c)}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _method(row: dict[str, Any]) -> str:
    method = row.get("method") or "?"
    front = row.get("front_method")
    return f"{method} + front {front}" if front else method


def summary_table(summary: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the mean ± std table, one row per (dataset, row).

    Returns:
        ``(headers, rows)``; the metric columns start at index 5.
    """
    headers = ["dataset", "row", "mode", "adapter", "seeds ok", *METRICS.values()]
    rows = []
    for s in summary:
        seeds = f"{s.get('n_ok', 0)}/{len(s.get('seeds', []))}"
        if s.get("n_failed"):
            seeds += f" ({s['n_failed']} failed)"
        rows.append(
            [
                str(s["dataset"]),
                str(s["row"]),
                str(s.get("mode") or "?"),
                _method(s),
                seeds,
                *(_summary_stat(k, s.get(k), s.get("n_ok", 0)) for k in METRICS),
            ]
        )
    return headers, rows


def cells_table(cells: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the per-cell table (status, metrics, error of a failed cell).

    Returns:
        ``(headers, rows)``; the metric columns start at index 4.
    """
    headers = ["dataset", "row", "seed", "status", *METRICS.values(), "run folder / error"]
    rows = []
    for c in cells:
        status = str(c["status"]) + (" (reused)" if c.get("reused") else "")
        last = c.get("error") or c.get("run_dir") or ""
        rows.append(
            [
                str(c["dataset"]),
                str(c["row"]),
                str(c["seed"]),
                status,
                *(fmt_value(k, c.get(k)) for k in METRICS),
                str(last),
            ]
        )
    return headers, rows


def comparison_table(comparisons: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the row-vs-baseline table (Δ in points, time ratios).

    Returns:
        ``(headers, rows)``; the numeric columns start at index 3.
    """
    headers = [
        "dataset",
        "row",
        "baseline",
        "Δ accuracy (points)",
        "Δ macro-F1 (points)",
        "train time ÷ baseline",
        "wall ÷ baseline",
        "bytes ÷ baseline",
    ]

    def num(value: Any, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    rows = [
        [
            str(c["dataset"]),
            str(c["row"]),
            str(c["baseline"]),
            num(c.get("accuracy_delta_points"), "+.2f"),
            num(c.get("macro_f1_delta_points"), "+.2f"),
            num(c.get("train_time_ratio"), ".2f"),
            num(c.get("wall_ratio"), ".2f"),
            num(c.get("bytes_ratio"), ".2f"),
        ]
        for c in comparisons
    ]
    return headers, rows


REFERENCE_NOTE = (
    "Every test row answered with the training split's most frequent label: what a model "
    "scores without learning anything from the text. A row at this accuracy and macro-F1 "
    "predicts one class, and its Δ against another such row says nothing about the method."
)


def scope_note(cells: Sequence[dict[str, Any]]) -> str | None:
    """A sentence naming the completed cells whose macro-F1 is their clients' mean (None if
    every completed cell's is the whole test split's)."""
    names = [
        c["name"]
        for c in cells
        if c["status"] == "ok" and c.get("macro_f1_scope", "whole") == "clients-mean"
    ]
    if not names:
        return None
    return (
        f"Macro-F1 of {len(names)} federated cell(s) is the sample-weighted mean of their "
        "clients' macro-F1 on their test shares, not the whole test split's (they ran before "
        "the server summed the shares' confusion matrices, or with federated.eval_confusion "
        f"off); their accuracy is the whole split's: {', '.join(names)}."
    )


def comparison_note(comparisons: Sequence[dict[str, Any]]) -> str | None:
    """Why a comparison has an accuracy Δ but no macro-F1 Δ (None if none is such)."""
    if not any(
        c.get("accuracy_delta_points") is not None and c.get("macro_f1_delta_points") is None
        for c in comparisons
    ):
        return None
    return (
        "Δ macro-F1 is – where the two rows' macro-F1 is not scored alike: the whole test "
        "split's against the federated clients' mean, or a row mixing both."
    )


def reference_table(references: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the majority-class reference, one row per dataset.

    Returns:
        ``(headers, rows)``; the numeric columns are 1, 3 and 4 (a dataset whose data could
        not be read has its reason in the majority-class column).
    """
    headers = ["dataset", "test rows", "majority class", "test accuracy", "test macro-F1"]
    rows = []
    for r in references:
        if r.get("error"):
            rows.append([str(r["dataset"]), "–", f"not computed: {r['error']}", "–", "–"])
            continue
        rows.append(
            [
                str(r["dataset"]),
                str(r["test_rows"]),
                str(r["majority_label"]),
                fmt_value("accuracy", r["accuracy"]),
                fmt_value("macro_f1", r["macro_f1"]),
            ]
        )
    return headers, rows
