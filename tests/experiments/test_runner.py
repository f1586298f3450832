"""The experiment runner on tiny-llama: one table with the right statistics, failures recorded,
interrupted experiments resumed (completed cells are not run again)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys

import pytest
import yaml
from _experiment import ROWS, experiment_data, run_cli, write_experiment
from _procs import REPO

from shieldtune.errors import ExitCode
from shieldtune.experiments import load_experiment, run_experiment, runner
from shieldtune.recipes import RECIPES
from shieldtune.report.tables import fmt_stat

METRICS = ("accuracy", "macro_f1", "train_time_s")


def _results(folder):
    return json.loads((folder / "results.json").read_text())


def _copy(tiny_experiment, tmp_path, table, rows=None):
    """The finished tiny experiment copied to a new folder, with its config pointed there."""
    out = tmp_path / "out"
    shutil.copytree(tiny_experiment.folder, out)
    data = experiment_data(table, out, rows=rows)
    return write_experiment(tmp_path / "experiment.yaml", data), out


def test_grid_runs_end_to_end_and_writes_one_table(tiny_experiment):
    assert tiny_experiment.exit_code == 0, tiny_experiment.output
    folder = tiny_experiment.folder
    results = _results(folder)
    assert results["status"] == {"cells": 4, "ok": 4, "failed": 0, "pending": 0}
    for summary in results["summary"]:
        cells = [
            c
            for c in results["cells"]
            if (c["dataset"], c["row"]) == (summary["dataset"], summary["row"])
        ]
        assert [c["seed"] for c in cells] == [0, 1]
        runs = [json.loads((folder / c["run_dir"] / "summary.json").read_text()) for c in cells]
        for key in METRICS:  # mean ± sample std of the per-cell summaries
            values = [r[key] for r in runs]
            assert summary[key]["mean"] == pytest.approx(statistics.fmean(values))
            assert summary[key]["std"] == pytest.approx(statistics.stdev(values))
        walls = [
            json.loads((folder / "cells" / f"{c['name']}.json").read_text())["wall_s"]
            for c in cells
        ]
        assert summary["wall_s"]["mean"] == pytest.approx(statistics.fmean(walls))
        assert summary["bytes_sent"]["n"] == 0  # local and plain-split send nothing
    local, split = results["summary"]
    (comparison,) = results["comparisons"]
    assert comparison["row"] == "plain-split LoRA" and comparison["baseline"] == "local LoRA"
    assert comparison["accuracy_delta_points"] == pytest.approx(
        100 * (split["accuracy"]["mean"] - local["accuracy"]["mean"])
    )
    assert comparison["train_time_ratio"] == pytest.approx(
        split["train_time_s"]["mean"] / local["train_time_s"]["mean"]
    )
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert [r["kind"] for r in rows] == ["summary"] * 2 + ["cell"] * 4
    assert float(rows[0]["accuracy"]) == pytest.approx(local["accuracy"]["mean"])
    assert float(rows[0]["accuracy_std"]) == pytest.approx(local["accuracy"]["std"])
    md = (folder / "results.md").read_text()
    for s in results["summary"]:
        assert f"| {s['row']} |" in md and fmt_stat("accuracy", s["accuracy"]) in md
    for name in ("experiment.yaml", "provenance.json"):
        assert (folder / name).is_file()


def test_failed_cell_is_recorded_and_the_grid_goes_on(tiny_experiment, tmp_path, keyword_table):
    broken = {"name": "broken", "overrides": {"mode": "local", "data.path": "/no/such.csv"}}
    config, out = _copy(tiny_experiment, tmp_path, keyword_table, rows=[broken, *ROWS])
    shutil.rmtree(out / "runs" / "kw__local-lora__seed1")  # runs after the failures
    result = run_cli("experiment", str(config))
    assert result.exit_code == ExitCode.DATA  # the first failed cell's error
    assert "2 of 6 cells failed" in result.output
    cells = {(c["row"], c["seed"]): c for c in _results(out)["cells"]}
    for seed in (0, 1):
        assert cells["broken", seed]["status"] == "failed"
        assert "/no/such.csv" in cells["broken", seed]["error"]
        name = cells["broken", seed]["name"]
        assert "Traceback" in (out / "cells" / f"{name}.traceback.txt").read_text()
    ran = cells["local LoRA", 1]
    assert ran["status"] == "ok" and not ran["reused"]
    assert (out / "runs" / "kw__local-lora__seed1" / "summary.json").is_file()
    assert all(
        cells[r["name"], s]["reused"]
        for r in ROWS
        for s in (0, 1)
        if (r["name"], s) != ("local LoRA", 1)
    )
    summary = {s["row"]: s for s in _results(out)["summary"]}
    assert (summary["broken"]["n_ok"], summary["broken"]["n_failed"]) == (0, 2)
    assert "failed" in (out / "results.md").read_text()


def test_interrupted_experiment_resumes_without_rerunning_completed_cells(
    tiny_experiment, tmp_path, keyword_table, monkeypatch
):
    config, out = _copy(tiny_experiment, tmp_path, keyword_table)
    missing = "kw__plain-split-lora__seed1"
    shutil.rmtree(out / "runs" / missing)
    real = RECIPES["plain-split"]

    def interrupted(cfg, on_progress=None):
        def stop(info):
            raise KeyboardInterrupt

        return real(cfg, on_progress=stop)

    monkeypatch.setitem(RECIPES, "plain-split", interrupted)
    plan = load_experiment(config)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(plan)
    status = {c["name"]: c["status"] for c in _results(out)["cells"]}
    assert status.pop(missing) == "pending" and set(status.values()) == {"ok"}
    assert (out / "runs" / f".partial-{missing}").is_dir()  # never looks complete

    calls = []

    def counted(cfg, on_progress=None):
        calls.append(cfg.run_name)
        return real(cfg, on_progress=on_progress)

    monkeypatch.setitem(RECIPES, "local", counted)
    monkeypatch.setitem(RECIPES, "plain-split", counted)
    records = run_experiment(plan)
    assert calls == [missing]  # only the unfinished cell ran
    assert [r["status"] for r in records] == ["ok"] * 4
    assert [r["reused"] for r in records] == [True, True, True, False]
    assert not list((out / "runs").glob(".partial-*"))
    invocations = json.loads((out / "provenance.json").read_text())["invocations"]
    assert invocations[-1]["ran"] == [missing]


def test_resume_refuses_cells_that_ran_another_config(tiny_experiment, tmp_path, keyword_table):
    config, out = _copy(tiny_experiment, tmp_path, keyword_table)
    result = run_cli("experiment", str(config), "--set", "train.lr=0.5")
    assert result.exit_code == ExitCode.CONFIG
    assert "ran another config (differs in train.lr)" in result.output


def test_resume_reads_a_field_added_since_a_cell_ran_as_its_default(
    tiny_experiment, tmp_path, keyword_table, monkeypatch
):
    # Prepare: one completed cell's saved config without split.clients (as written before that
    # field existed), another's with a non-default value of it
    config, out = _copy(tiny_experiment, tmp_path, keyword_table)
    saved = out / "runs" / "kw__local-lora__seed0" / "config.yaml"
    data = yaml.safe_load(saved.read_text())
    del data["split"]["clients"]
    saved.write_text(yaml.safe_dump(data))
    calls = []
    for mode in ("local", "plain-split"):
        monkeypatch.setitem(RECIPES, mode, lambda cfg, on_progress=None: calls.append(cfg))
    # Execute / assert: the old cell is reused, nothing runs
    result = run_cli("experiment", str(config))
    assert result.exit_code == 0, result.output
    assert calls == []
    # Negative: a saved value other than the default is still another config
    data["split"]["clients"] = 2
    saved.write_text(yaml.safe_dump(data))
    refused = run_cli("experiment", str(config))
    assert refused.exit_code == ExitCode.CONFIG
    assert "ran another config (differs in split.clients)" in refused.output and calls == []
    # Negative: a saved config the schema no longer accepts is named, not reused
    data["split"]["clients"] = "many"
    saved.write_text(yaml.safe_dump(data))
    broken = run_cli("experiment", str(config))
    assert broken.exit_code == ExitCode.CONFIG
    assert "is no longer a valid config" in broken.output and calls == []


def test_collect_writes_the_table_of_copied_cells_and_runs_nothing(
    tiny_experiment, tmp_path, keyword_table, monkeypatch
):
    # Prepare: a fresh folder holding only the seed-0 cells, copied from the finished grid (as
    # from another machine, or from an experiment over a subset of the seeds)
    out = tmp_path / "merged"
    config = write_experiment(tmp_path / "exp.yaml", experiment_data(keyword_table, out))
    for cell in ("kw__local-lora__seed0", "kw__plain-split-lora__seed0"):
        shutil.copytree(tiny_experiment.folder / "runs" / cell, out / "runs" / cell)
    calls = []
    for mode in ("local", "plain-split"):
        monkeypatch.setitem(RECIPES, mode, lambda cfg, on_progress=None: calls.append(cfg))
    # Execute
    result = run_cli("experiment", str(config), "--collect")
    # Assert: nothing ran, the copied cells are in the table, the others pending
    assert result.exit_code == 0, result.output
    assert calls == []
    cells = {c["name"]: c for c in _results(out)["cells"]}
    assert {n: c["status"] for n, c in cells.items()} == {
        "kw__local-lora__seed0": "ok",
        "kw__local-lora__seed1": "pending",
        "kw__plain-split-lora__seed0": "ok",
        "kw__plain-split-lora__seed1": "pending",
    }
    done = json.loads((out / "runs" / "kw__local-lora__seed0" / "summary.json").read_text())
    assert cells["kw__local-lora__seed0"]["accuracy"] == done["accuracy"]
    invocation = json.loads((out / "provenance.json").read_text())["invocations"][-1]
    assert invocation["collect"] is True and invocation["ran"] == []
    # Negative: a copied cell that ran another config is refused, nothing written over
    bad = write_experiment(
        tmp_path / "bad.yaml",
        {
            **experiment_data(keyword_table, out),
            "base": {
                **experiment_data(keyword_table, out)["base"],
                "train": {"epochs": 1, "max_steps": 3, "batch_size": 8, "lr": 0.003},
            },
        },
    )
    refused = run_cli("experiment", str(bad), "--collect")
    assert refused.exit_code == ExitCode.CONFIG
    assert "ran another config" in refused.output and calls == []


def test_table_says_over_how_many_seeds_a_metric_some_cells_lack(
    tiny_experiment, tmp_path, keyword_table
):
    # Prepare: one cell's record gone, as for a run folder copied in from outside the
    # experiment (only a cell run in the folder records its wall time)
    config, out = _copy(tiny_experiment, tmp_path, keyword_table)
    (out / "cells" / "kw__local-lora__seed1.json").unlink()
    # Execute
    result = run_cli("experiment", str(config), "--collect")
    # Assert: that row's wall time is over 1 of its 2 seeds, and the table says so
    assert result.exit_code == 0, result.output
    summary = {s["row"]: s for s in _results(out)["summary"]}
    lora, split = summary[ROWS[0]["name"]], summary[ROWS[1]["name"]]
    assert lora["n_ok"] == 2 and lora["wall_s"]["n"] == 1 and lora["accuracy"]["n"] == 2
    rows: dict[str, str] = {}  # each row's first line: the mean ± std table's
    for line in (out / "results.md").read_text().splitlines():
        if line.startswith("| kw | "):
            rows.setdefault(line.split(" | ")[1], line)
    lora_line = rows[ROWS[0]["name"]]
    assert f"{fmt_stat('wall_s', lora['wall_s'])} (1 of 2 seeds)" in lora_line
    assert lora_line.count("of 2 seeds") == 1  # accuracy, train time: every seed, unmarked
    # Negative: the row whose cells all kept their records is not marked
    assert split["wall_s"]["n"] == 2 and "seeds)" not in rows[ROWS[1]["name"]]


def test_selected_cells_run_and_every_cell_is_tabled(tmp_path, keyword_table, monkeypatch):
    # Prepare: a fresh folder; recipes counted (and run for real)
    out = tmp_path / "out"
    config = write_experiment(tmp_path / "exp.yaml", experiment_data(keyword_table, out))
    calls = []
    for mode in ("local", "plain-split"):
        real = RECIPES[mode]

        def counted(cfg, on_progress=None, real=real):
            calls.append(cfg.run_name)
            return real(cfg, on_progress=on_progress)

        monkeypatch.setitem(RECIPES, mode, counted)
    # Execute
    result = run_cli("experiment", str(config), "--seed", "1", "--row", "local LoRA")
    # Assert: only that cell ran; the table lists every cell, the others pending
    assert result.exit_code == 0, result.output
    assert calls == ["kw__local-lora__seed1"]
    status = {c["name"]: c["status"] for c in _results(out)["cells"]}
    assert status == {
        "kw__local-lora__seed0": "pending",
        "kw__local-lora__seed1": "ok",
        "kw__plain-split-lora__seed0": "pending",
        "kw__plain-split-lora__seed1": "pending",
    }
    (invocation,) = json.loads((out / "provenance.json").read_text())["invocations"]
    assert invocation["only"] == invocation["ran"] == ["kw__local-lora__seed1"]
    # Negative: values the experiment lacks are named with its values, nothing runs
    bad = run_cli("experiment", str(config), "--seed", "7", "--row", "nope", "--dataset", "kw")
    assert bad.exit_code == ExitCode.CONFIG
    assert "--seed 7: the experiment has no such seed; its seeds: 0, 1" in bad.output
    assert "--row 'nope': the experiment has no such row" in bad.output
    both = run_cli("experiment", str(config), "--collect", "--seed", "0")
    assert both.exit_code == ExitCode.CONFIG and "--collect runs no cell" in both.output
    assert calls == ["kw__local-lora__seed1"]


def test_a_cell_another_invocation_runs_is_left_to_it_and_tabled_once_done(
    tiny_experiment, tmp_path, keyword_table, monkeypatch
):
    # Prepare: two cells missing; another invocation holds local-lora seed 1's lock, and
    # completes it while this one runs plain-split seed 1
    config, out = _copy(tiny_experiment, tmp_path, keyword_table)
    held, mine = "kw__local-lora__seed1", "kw__plain-split-lora__seed1"
    for name in (held, mine):
        shutil.rmtree(out / "runs" / name)
    real, real_local, calls = RECIPES["plain-split"], RECIPES["local"], []

    def split_then_other_finishes(cfg, on_progress=None):
        calls.append(cfg.run_name)
        run_dir = real(cfg, on_progress=on_progress)
        shutil.copytree(tiny_experiment.folder / "runs" / held, out / "runs" / held)
        return run_dir

    monkeypatch.setitem(RECIPES, "plain-split", split_then_other_finishes)
    monkeypatch.setitem(RECIPES, "local", lambda cfg, on_progress=None: calls.append(cfg))
    seen = {}
    # Execute
    with runner._lock(out / runner.LOCKS_DIR / f"{held}.lock") as other:
        assert other
        records = run_experiment(
            load_experiment(config), on_record=lambda i, r: seen.setdefault(r["name"], r)
        )
    # Assert: the held cell was not run here, was reported as running elsewhere, and the table
    # written last holds it, completed
    assert calls == [mine]
    assert seen[held]["status"] == "pending" and seen[held]["elsewhere"] is True
    assert [r["status"] for r in records] == ["ok"] * 4
    assert {c["name"]: c["status"] for c in _results(out)["cells"]}[held] == "ok"
    invocations = json.loads((out / "provenance.json").read_text())["invocations"]
    assert invocations[-1]["ran"] == [mine]
    # Negative: without the lock held the cell is this invocation's to run
    shutil.rmtree(out / "runs" / held)

    def local(cfg, on_progress=None):
        calls.append(cfg.run_name)
        return real_local(cfg, on_progress=on_progress)

    monkeypatch.setitem(RECIPES, "local", local)
    records = run_experiment(load_experiment(config))
    assert calls == [mine, held] and records[1]["status"] == "ok" and not records[1]["reused"]


def test_two_processes_share_one_grid_and_run_each_cell_once(tmp_path, keyword_table):
    # Prepare: the tiny grid in a fresh folder, two real `shieldtune experiment` processes on it
    out = tmp_path / "out"
    config = write_experiment(tmp_path / "exp.yaml", experiment_data(keyword_table, out))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    argv = [sys.executable, "-m", "shieldtune.cli.app", "experiment", str(config)]
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    # Assert: both succeed; every cell ran in exactly one of them; the table is complete
    assert [p.returncode for p in procs] == [0, 0], outputs
    invocations = json.loads((out / "provenance.json").read_text())["invocations"]
    ran = [name for i in invocations for name in i["ran"]]
    cells = [c["name"] for c in _results(out)["cells"]]
    assert len(invocations) == 2 and sorted(ran) == sorted(cells)
    assert [c["status"] for c in _results(out)["cells"]] == ["ok"] * 4
    assert not list((out / "runs").glob(".partial-*"))
