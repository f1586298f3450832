"""Experiment configs: validated at the edge, every cell built before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from _experiment import experiment_data, run_cli, write_experiment

from shieldtune.errors import ConfigError, ExitCode
from shieldtune.experiments import load_experiment, merge_overrides

EXPERIMENTS = sorted(
    (Path(__file__).resolve().parents[2] / "configs" / "experiments").glob("*.yaml")
)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_shipped_experiment_plans(path):
    plan = load_experiment(path)
    c = plan.config
    assert len(plan.cells) == len(c.datasets) * len(c.rows) * len(c.seeds)
    assert len({cell.name for cell in plan.cells}) == len(plan.cells)


def test_paper_grid_has_the_papers_rows_on_the_medical_sets():
    plan = load_experiment(
        Path(__file__).resolve().parents[2] / "configs/experiments/paper_minilm.yaml"
    )
    assert plan.config.seeds == [0, 1, 2]
    assert {c.config.data.dataset for c in plan.cells} == {"medical_abstracts", "pubmedqa", "mqp"}
    assert {c.config.model.name for c in plan.cells} == {"minilm"}
    kinds = {
        (
            c.config.mode,
            c.config.adapter["method"],
            (c.config.split.front_adapter or {}).get("method")
            if "split" in c.config.mode
            else None,
        )
        for c in plan.cells
    }
    for kind in [
        ("local", "lora", None),
        ("local", "prefix", None),
        ("shielded-fedavg", "lora", None),
        ("shielded-fedavg", "prefix", None),
        ("split", "lora", None),
        ("split", "lora", "spf"),
        ("local", "full", None),
    ]:
        assert kind in kinds, kind
    fed = [c.config for c in plan.cells if c.config.mode == "shielded-fedavg"]
    assert {f.federated.num_clients for f in fed} == {3}


def test_overrides_merge_sections_and_replace_adapters():
    base = {"adapter": {"method": "lora", "rank": 8}, "train": {"lr": 0.1, "epochs": 3}}
    out = merge_overrides(
        base, {"adapter": {"method": "prefix"}, "train": {"lr": 0.2}, "split.cut": 1}
    )
    assert out == {
        "adapter": {"method": "prefix"},  # replaced whole: no LoRA rank on a prefix
        "train": {"lr": 0.2, "epochs": 3},  # merged
        "split": {"cut": 1},  # dotted path
    }
    assert base["train"]["lr"] == 0.1  # not modified


def test_cells_take_the_dataset_row_and_seed(tmp_path, keyword_table):
    file = write_experiment(tmp_path / "e.yaml", experiment_data(keyword_table, tmp_path / "out"))
    plan = load_experiment(file, ["train.lr=0.01"])
    cell = next(c for c in plan.cells if c.row == "plain-split LoRA" and c.seed == 1)
    cfg = cell.config
    assert (cfg.mode, cfg.split.cut, cfg.train.seed, cfg.train.lr) == ("plain-split", 1, 1, 0.01)
    assert cfg.data.dataset == "table" and cfg.data.path == str(keyword_table)
    assert cell.run_dir == tmp_path / "out" / "runs" / "kw__plain-split-lora__seed1"


def _problems(tmp_path, data) -> list[str]:
    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_experiment(file)
    return info.value.problems


def test_every_problem_is_named_at_once(tmp_path, keyword_table):
    data = experiment_data(keyword_table, tmp_path / "out")
    data["rows"] = [
        {"name": "a", "overrides": {"train.epochs": 0}},
        {"name": "b", "overrides": {"adapter": {"method": "nope"}}, "baseline": "zzz"},
        {"name": "c", "overrides": {"mode": "local", "data.dataset": "no_such_set"}},
    ]
    problems = _problems(tmp_path, data)
    text = "\n".join(problems)
    assert "row 'a'" in text and "train.epochs" in text
    assert "adapter.method" in text and "nope" in text
    assert "baseline 'zzz'" in text
    assert "unknown dataset 'no_such_set'" in text and "medical_abstracts" in text
    assert len(problems) == 4  # one per problem, not one per seed


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"rows": [{"name": "a", "overides": {}}]}, "rows.0.overides"),
        ({"seeds": [0, 0]}, "seeds"),
        ({"rows": []}, "rows"),
        ({"base": "no/such/run.yaml"}, "does not exist"),
        ({"rows": [{"name": "A b"}, {"name": "a-B"}]}, "not unique"),
    ],
)
def test_bad_experiment_configs(tmp_path, keyword_table, change, message):
    data = {**experiment_data(keyword_table, tmp_path / "out"), **change}
    assert any(message in p for p in _problems(tmp_path, data))


def test_cli_bad_config_gives_exit_code_3_and_one_line_each(tmp_path, keyword_table):
    data = experiment_data(keyword_table, tmp_path / "out")
    data["rows"][0]["overrides"]["train.lr"] = -1
    file = write_experiment(tmp_path / "e.yaml", data)
    result = run_cli("experiment", str(file))
    assert result.exit_code == ExitCode.CONFIG
    assert "train.lr" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written
    result = run_cli("experiment", str(tmp_path / "missing.yaml"))
    assert result.exit_code == ExitCode.CONFIG and "does not exist" in result.output
