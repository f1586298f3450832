"""The results table's majority-class reference: what a model that learned nothing scores."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from _experiment import experiment_data, write_experiment

from shieldtune.data.splits import train_test_split
from shieldtune.data.tables import load_table
from shieldtune.experiments import load_experiment
from shieldtune.experiments.results import (
    majority_references,
    ok_record,
    pending_record,
    write_results,
)


def _skewed_table(path):
    """Three classes, 60 / 30 / 10 rows: the majority class is 'a'."""
    rows = ["text,label"] + [
        f"row {i},{'a' if i < 60 else 'b' if i < 90 else 'c'}" for i in range(100)
    ]
    path.write_text("\n".join(rows))
    return path


def _plan(tmp_path, table, rows=None):
    data = experiment_data(table, tmp_path / "out", rows=rows)
    return load_experiment(write_experiment(tmp_path / "exp.yaml", data))


def test_reference_is_the_training_majority_scored_on_the_test_split(tmp_path):
    table = _skewed_table(tmp_path / "skewed.csv")
    plan = _plan(tmp_path, table)
    (ref,) = majority_references(plan)
    # the same split the cells' recipes make (split seed 0, 20 % test, capped at 16 test rows)
    ds = load_table(table, text="text", label="label")
    train, test = train_test_split(ds, test_fraction=0.2, seed=0)
    test_labels = test.labels()[:16]
    top = Counter(train.labels()).most_common(1)[0][0]
    share = test_labels.count(top) / len(test_labels)
    # one class predicted: its F1 is 2p / (1 + p), every other present class scores 0
    expected_f1 = 2 * share / (1 + share) / len(set(test_labels))
    assert ref == {
        "dataset": "kw",
        "test_rows": 16,
        "majority_label": ds.label_names[top],
        "accuracy": pytest.approx(share),
        "macro_f1": pytest.approx(expected_f1),
    }
    assert ds.label_names[top] == "a" and 0.4 < share < 1.0
    # written with the table: results.json and results.md carry it
    results = write_results(plan, [pending_record(c) for c in plan.cells])
    assert results["references"] == [ref]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## Reference: the majority class" in md
    assert f"| kw | 16 | a | {share:.3f} | {expected_f1:.3f} |" in md


def test_reference_max_length_may_differ_but_not_the_split(tmp_path):
    table = _skewed_table(tmp_path / "skewed.csv")
    same_split = [
        {"name": "short", "overrides": {"mode": "local", "data.max_length": 16}},
        {"name": "long", "overrides": {"mode": "local", "data.max_length": 32}},
    ]
    assert "error" not in majority_references(_plan(tmp_path, table, same_split))[0]
    other_split = [
        {"name": "all test rows", "overrides": {"mode": "local"}},
        {"name": "8 test rows", "overrides": {"mode": "local", "data.max_test_examples": 8}},
    ]
    (ref,) = majority_references(_plan(tmp_path, table, other_split))
    assert ref == {"dataset": "kw", "error": "its rows read or split the data differently"}


def test_unreadable_data_leaves_the_reference_out_and_the_table_written(tmp_path):
    table = _skewed_table(tmp_path / "skewed.csv")
    plan = _plan(tmp_path, table)
    table.unlink()  # --collect on a machine without the data
    results = write_results(plan, [pending_record(c) for c in plan.cells])
    (ref,) = results["references"]
    assert set(ref) == {"dataset", "error"} and "skewed.csv" in ref["error"]
    assert "accuracy" not in ref
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["status"]["pending"] == 4 and saved["references"] == [ref]
    assert "| kw | – | not computed: " in (tmp_path / "out" / "results.md").read_text()


def test_federated_cells_without_the_whole_split_macro_f1_are_named(tmp_path):
    plan = _plan(tmp_path, _skewed_table(tmp_path / "skewed.csv"))
    first, second, *rest = plan.cells
    base = {"accuracy": 0.5, "macro_f1": 0.4, "train_time_s": 1.0, "steps": 1}
    old_fed = {**base, "mode": "plain-fedavg", "clients": 3}  # macro-F1 = the clients' mean
    new_fed = {**old_fed, "macro_f1_client_mean": 0.39}  # summed confusion matrices
    records = [ok_record(first, old_fed, 1.0, False), ok_record(second, new_fed, 1.0, False)]
    assert [r["macro_f1_scope"] for r in records] == ["clients-mean", "whole"]
    one_client = ok_record(first, {**old_fed, "clients": 1}, 1.0, False)
    assert one_client["macro_f1_scope"] == "whole"  # one share is the whole split
    assert ok_record(first, {**base, "mode": "local"}, 1.0, False)["macro_f1_scope"] == "whole"

    write_results(plan, [*records, *(pending_record(c) for c in rest)])
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Macro-F1 of 1 federated cell(s)" in md and first.name in md.split("## ")[0]
    assert second.name not in md.split("## ")[0]  # named only in the cell table below
    write_results(plan, [records[1], *(pending_record(c) for c in [first, *rest])])
    assert "federated cell(s)" not in (tmp_path / "out" / "results.md").read_text()


def test_macro_f1_delta_only_between_rows_of_one_scope(tmp_path):
    plan = _plan(tmp_path, _skewed_table(tmp_path / "skewed.csv"))
    cells = {(c.row, c.seed): c for c in plan.cells}
    old = {"accuracy": 0.5, "macro_f1": 0.40, "train_time_s": 1.0, "clients": 3}  # clients' mean
    new = {**old, "macro_f1": 0.45, "macro_f1_client_mean": 0.40}  # whole split

    def comparison(baseline: list[dict], row: list[dict]) -> dict:
        records = [
            ok_record(cells[(name, seed)], summary, 1.0, False)
            for name, summaries in (("local LoRA", baseline), ("plain-split LoRA", row))
            for seed, summary in enumerate(summaries)
        ]
        (cmp,) = write_results(plan, records)["comparisons"]
        return cmp

    same = comparison([old, old], [{**old, "macro_f1": 0.42}] * 2)  # both the clients' mean
    assert same["macro_f1_delta_points"] == pytest.approx(2.0)
    whole = comparison([new, new], [{**new, "macro_f1": 0.42}] * 2)  # both the whole split's
    assert whole["macro_f1_delta_points"] == pytest.approx(-3.0)
    # a whole split's macro-F1 against the clients' mean, or a row mixing both: no Δ
    assert comparison([old, old], [new, new])["macro_f1_delta_points"] is None
    mixed = comparison([new, new], [old, new])
    assert mixed["macro_f1_delta_points"] is None
    assert mixed["accuracy_delta_points"] == pytest.approx(0.0)  # accuracy is always the whole's
    summary = json.loads((tmp_path / "out" / "results.json").read_text())["summary"]
    assert [s["macro_f1_scope"] for s in summary] == ["whole", "mixed"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| kw | plain-split LoRA | local LoRA | +0.00 | – |" in md
    assert "Δ macro-F1 is – where the two rows' macro-F1 is not scored alike" in md
    comparison([new, new], [new, new])
    assert "not scored alike" not in (tmp_path / "out" / "results.md").read_text()
