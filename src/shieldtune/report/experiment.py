"""The report of an experiment folder: ``report.html`` (self-contained) and ``report.md``.

Reads what ``shieldtune experiment`` wrote (``results.json``, ``experiment.yaml``,
``provenance.json``, each cell's run folder) and, when present, what was added to the folder:

- ``attacks/*.json``: attack rows (``attack, mode, cut, defence, metric, value, chance``), as
  ``benchmarks/attack_leakage.py --json`` or :func:`shieldtune.attacks.run_attacks` write them;
- ``benchmarks/*``: benchmark output whose lines hold JSON objects (the last line of each
  ``benchmarks/*.py``; ``bench_plain_modes.py --json`` gives one per mode).

A section whose inputs are absent says so; nothing is estimated or filled in.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from shieldtune.errors import ConfigError
from shieldtune.report.figures import curves_figure, leakage_figure
from shieldtune.report.page import (
    Image,
    Paragraph,
    Pre,
    Section,
    Table,
    render_html,
    render_markdown,
)
from shieldtune.report.tables import (
    REFERENCE_NOTE,
    cells_table,
    comparison_note,
    comparison_table,
    reference_table,
    scope_note,
    summary_table,
)

__all__ = ["REPORT_HTML", "REPORT_MD", "write_report", "attack_rows", "benchmark_lines"]

REPORT_HTML, REPORT_MD = "report.html", "report.md"


def _json_lines(path: Path) -> list[Any]:
    """JSON values of a file: the whole file if it parses, else every line that does."""
    text = path.read_text(errors="replace")
    try:
        return [json.loads(text)]
    except ValueError:
        pass
    out = []
    for line in text.splitlines():
        if line.strip().startswith(("{", "[")):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def attack_rows(folder: Path) -> list[dict[str, Any]]:
    """Every attack row in ``folder/attacks/*.json`` (each file a JSON list of rows)."""
    rows = []
    for file in sorted((folder / "attacks").glob("*.json")):
        for value in _json_lines(file):
            items = value if isinstance(value, list) else [value]
            rows += [
                {**r, "file": file.name}
                for r in items
                if isinstance(r, dict) and {"attack", "metric", "value"} <= r.keys()
            ]
    return rows


def benchmark_lines(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(file name, object)`` for every JSON object line in ``folder/benchmarks/*``."""
    out = []
    for file in sorted((folder / "benchmarks").glob("*")):
        if file.is_file():
            out += [(file.name, v) for v in _json_lines(file) if isinstance(v, dict)]
    return out


def _flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out.update(_flatten(item, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = item
    return out


def _md_cells(line: str) -> list[str]:
    """The cells of one Markdown table line."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _cols(first: int, count: int) -> tuple[int, ...]:
    return tuple(range(first, first + count))


# ------------------------------------------------------------------------------ sections
def _results_section(results: dict[str, Any]) -> Section:
    status = results["status"]
    s = Section("Results")
    s.blocks.append(
        Paragraph(
            f"{status['ok']} of {status['cells']} cells completed, {status['failed']} failed, "
            f"{status['pending']} not run. Each cell is one run of `shieldtune train`'s code "
            "(the mode's recipe). Mean ± sample standard deviation over the completed seeds "
            f"({', '.join(str(x) for x in results['seeds'])}). Accuracy and macro-F1 are the "
            "final test metrics; train s is the run's own training time (the whole federation "
            "for FedAvg modes), wall s the whole cell (loading, training, evaluation, saving); "
            "bytes sent is what crossed between the run's processes in both directions (split "
            "wire, Flower messages, or a shielded party's masked operands), – where the mode "
            "runs in one process."
        )
    )
    s.blocks.append(Table(*summary_table(results["summary"]), numeric=_cols(5, 5)))
    note = scope_note(results["cells"])
    if note:
        s.blocks.append(Paragraph(note))
    if results.get("references"):  # results.json from before the reference existed has none
        s.blocks.append(Paragraph(f"Reference, the majority class: {REFERENCE_NOTE}"))
        s.blocks.append(Table(*reference_table(results["references"]), numeric=(1, 3, 4)))
    failed = [c for c in results["cells"] if c["status"] == "failed"]
    if failed:
        s.blocks.append(
            Paragraph(f"{len(failed)} cell(s) failed; their errors are in the cell table below.")
        )
    return s


def _overhead_section(results: dict[str, Any], folder: Path) -> Section:
    s = Section("Overhead ratios")
    if results["comparisons"]:
        s.blocks.append(
            Paragraph(
                "From this grid: each row against the baseline row its config names (means over "
                "seeds; Δ in percentage points, ratios row ÷ baseline)."
            )
        )
        s.blocks.append(Table(*comparison_table(results["comparisons"]), numeric=_cols(3, 5)))
        why = comparison_note(results["comparisons"])
        if why:
            s.blocks.append(Paragraph(why))
    else:
        s.blocks.append(
            Paragraph("From this grid: none (no row of the experiment names a baseline).")
        )
    lines = benchmark_lines(folder)
    ratios = [
        [name, key, f"{value:.3f}"]
        for name, obj in lines
        for key, value in _flatten(obj).items()
        if "ratio" in key and isinstance(value, int | float)
    ]
    steps = {o["mode"]: float(o["step_s"]) for _, o in lines if {"mode", "step_s"} <= o.keys()}
    base = steps.get("local-lora")
    if base:
        ratios += [
            ["bench_plain_modes", f"{m} step ÷ local-lora", f"{t / base:.3f}"]
            for m, t in steps.items()
        ]
    if ratios:
        s.blocks.append(Paragraph("From benchmark output in benchmarks/ (its JSON lines):"))
        s.blocks.append(Table(["file", "ratio", "value"], ratios, numeric=(2,)))
    else:
        s.blocks.append(
            Paragraph(
                "From benchmarks: none. No benchmark output with ratios in this folder (looked "
                "for JSON lines in benchmarks/*). To add some, save a benchmark's output there, "
                "e.g. `.venv/bin/python benchmarks/bench_split.py > DIR/benchmarks/split.txt`."
            )
        )
    return s


def _cell_runs(results: dict[str, Any], folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Per dataset, the training and evaluation curves of each completed cell."""
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for c in results["cells"]:
        metrics = folder / str(c.get("run_dir") or "") / "metrics.jsonl"
        if c["status"] != "ok" or not metrics.is_file():
            continue
        lines = [v for v in _json_lines(metrics) if isinstance(v, dict)]
        if lines and not any("kind" in v for v in lines):
            continue
        train = [(r["step"], r["loss"]) for r in lines if r.get("kind") == "train" and "loss" in r]
        evals = [
            (r["epoch"], r["accuracy"])
            for r in lines
            if r.get("kind") == "eval" and "accuracy" in r
        ]
        by_dataset.setdefault(c["dataset"], []).append(
            {"row": c["row"], "seed": c["seed"], "train": train, "eval": evals}
        )
    return by_dataset


def _curves_section(results: dict[str, Any], folder: Path) -> Section:
    s = Section("Training curves")
    runs = _cell_runs(results, folder)
    if not runs:
        s.blocks.append(Paragraph("None: no completed cell has a metrics.jsonl."))
        return s
    s.blocks.append(
        Paragraph(
            "From each completed cell's metrics.jsonl. Every run folder also holds its own "
            "curves.png (runs/<cell>/curves.png)."
        )
    )
    for i, (dataset, items) in enumerate(runs.items()):
        png = curves_figure(dataset, items)
        s.blocks.append(Image(f"curves_{i}.png", png, f"training curves, {dataset}"))
    return s


def _leakage_section(folder: Path) -> Section:
    s = Section("Leakage by cut layer")
    rows = attack_rows(folder)
    if not rows:
        s.blocks.append(
            Paragraph(
                "No attack results in this folder (looked for JSON lists of attack rows in "
                "attacks/*.json), so there is no leakage plot. `.venv/bin/python "
                "benchmarks/attack_leakage.py --json DIR/attacks/leakage.json` writes them."
            )
        )
        return s
    by_cut = [r for r in rows if r.get("cut") is not None]
    if by_cut:
        for metric in ("token_recovery", "rouge_l"):
            if any(r["metric"] == metric for r in by_cut):
                s.blocks.append(
                    Image(f"leakage_{metric}.png", leakage_figure(by_cut, metric), metric)
                )
    headers, table = _leakage_table(rows)
    s.blocks.append(Table(headers, table, numeric=(4, *range(6, len(headers)))))
    return s


def _leakage_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One line per (file, attack, adapter, mode, cut, defence); a column per metric: value
    (chance). Rows without an adapter (hidden-state inversion) show "–" there."""
    metrics = list(dict.fromkeys(str(r["metric"]) for r in rows))
    lines: dict[tuple[str, ...], dict[str, str]] = {}
    for r in rows:
        key = (
            str(r.get("file")),
            str(r["attack"]),
            "–" if r.get("adapter") is None else str(r["adapter"]),
            str(r.get("mode")),
            "–" if r.get("cut") is None else str(r["cut"]),
            str(r.get("defence", "none")),
        )
        chance = "" if r.get("chance") is None else f" ({float(r['chance']):.3f})"
        lines.setdefault(key, {})[str(r["metric"])] = f"{float(r['value']):.3f}{chance}"
    headers = [
        "file",
        "attack",
        "adapter",
        "mode",
        "cut",
        "defence",
        *(f"{m} (chance)" for m in metrics),
    ]
    table = [[*key, *(cells.get(m, "–") for m in metrics)] for key, cells in lines.items()]
    return headers, table


def _cells_section(results: dict[str, Any]) -> Section:
    s = Section("Cells")
    s.blocks.append(
        Paragraph("One row per run (dataset × row × seed); a failed cell shows its error.")
    )
    s.blocks.append(Table(*cells_table(results["cells"]), numeric=(2, *_cols(4, 5))))
    return s


def _provenance_section(folder: Path, results: dict[str, Any]) -> Section:
    s = Section("Provenance")
    s.blocks.append(Paragraph(f"Seeds: {', '.join(str(x) for x in results['seeds'])}."))
    config = folder / "experiment.yaml"
    if config.is_file():
        s.blocks.append(Paragraph("Experiment config (experiment.yaml, base run config read in):"))
        s.blocks.append(Pre(config.read_text()))
    try:
        invocations = json.loads((folder / "provenance.json").read_text())["invocations"]
    except (OSError, ValueError, KeyError, TypeError):
        s.blocks.append(
            Paragraph("No provenance.json in this folder: machine and versions unknown.")
        )
        return s
    last = invocations[-1]

    def kernels(inv: dict) -> str:
        return f", torch kernels {inv['cpu_kernels']}" if inv.get("cpu_kernels") else ""

    machine = [
        ["python", str(last.get("python"))],
        ["platform", str(last.get("platform"))],
        ["CPU", f"{last.get('cpu')} ({last.get('cpu_count')} logical cores{kernels(last)})"],
        ["accelerator", str(last.get("accelerator"))],
        *[[name, str(v or "not installed")] for name, v in last.get("packages", {}).items()],
    ]
    s.blocks.append(Paragraph("Machine and package versions (the latest invocation):"))
    s.blocks.append(Table(["what", "value"], machine))
    inv = [
        [str(i.get("written")), str(i.get("command")), str(len(i.get("ran", [])))]
        for i in invocations
    ]
    s.blocks.append(Table(["invocation", "command", "cells run"], inv, numeric=(2,)))
    if len({json.dumps(i.get("packages"), sort_keys=True) for i in invocations}) > 1:
        s.blocks.append(Paragraph("Warning: package versions differ between invocations."))
    cpus = sorted({f"{i.get('cpu')}{kernels(i)}" for i in invocations if i.get("cpu_kernels")})
    if len(cpus) > 1:
        s.blocks.append(
            Paragraph(
                f"Warning: cells ran on different CPUs ({'; '.join(cpus)}): times from "
                "different machines do not compare directly."
            )
        )
    data = last.get("data", [])
    if data:
        s.blocks.append(Paragraph("Data attribution (keep it with any result built on the data):"))
        rows = [
            [str(d["dataset"]), str(d.get("name")), str(d.get("source")), str(d.get("licence"))]
            for d in data
        ]
        s.blocks.append(Table(["dataset", "data.dataset", "source", "licence"], rows))
        readme = list(dict.fromkeys(r for d in data for r in d.get("readme_rows", [])))
        header = next((d.get("readme_header") for d in data if d.get("readme_header")), None)
        if readme and header:
            where = next(d["data_dir"] for d in data if d.get("readme_rows"))
            s.blocks.append(Paragraph(f"The data folder's README ({where}/README.md) says:"))
            s.blocks.append(Table(_md_cells(header), [_md_cells(r) for r in readme]))
    return s


def write_report(folder: Path | str) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into an experiment folder.

    Args:
        folder: What ``shieldtune experiment`` wrote (it holds ``results.json``).

    Returns:
        ``(report.html, report.md)``.

    Raises:
        ConfigError: The folder holds no readable ``results.json``.
    """
    folder = Path(folder)
    try:
        results = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{folder} is not an experiment folder (no readable results.json: {err}); "
            "run `shieldtune experiment CONFIG` first"
        ) from None
    title = f"Experiment report: {results.get('experiment', folder.name)}"
    intro = Section("About this report")
    intro.blocks.append(
        Paragraph(
            f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `shieldtune report` from "
            f"{folder}. report.html is self-contained: its figures are embedded as base64 PNG; "
            "report.md refers to the same figures under report_files/."
        )
    )
    sections = [
        intro,
        _results_section(results),
        _overhead_section(results, folder),
        _curves_section(results, folder),
        _leakage_section(folder),
        _cells_section(results),
        _provenance_section(folder, results),
    ]
    html_file, md_file = folder / REPORT_HTML, folder / REPORT_MD
    md_file.write_text(render_markdown(title, sections, folder))
    html_file.write_text(render_html(title, sections))
    return html_file, md_file
