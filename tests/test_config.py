"""Config: validated once, unknown keys refused, every problem named; every shipped YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from shieldtune.config import RunConfig, apply_overrides, load_config, to_yaml
from shieldtune.errors import ConfigError

_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# run configs; configs/experiments/ holds experiment grids (loaded by tests/experiments/)
CONFIGS = sorted(
    p for p in _CONFIG_DIR.rglob("*.yaml") if p.relative_to(_CONFIG_DIR).parts[0] != "experiments"
)


def test_defaults_and_round_trip(tmp_path):
    cfg = load_config(None)
    assert cfg.mode == "local" and cfg.adapter == {"method": "lora"}
    file = tmp_path / "c.yaml"
    file.write_text(to_yaml(cfg))
    assert load_config(file) == cfg


def test_overrides_parse_yaml_scalars_and_nested_keys():
    cfg = load_config(
        None,
        [
            "train.epochs=2",
            "adapter.rank=4",
            "split.front_adapter={method: spf}",
            "mode=plain-split",
        ],
    )
    assert cfg.train.epochs == 2 and cfg.adapter["rank"] == 4
    assert cfg.split.front_adapter == {"method": "spf"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=0", r"train\.epochs"),
        ("trian.epochs=1", r"trian: Extra inputs"),
        ("mode=bogus", r"mode: Input should be 'local', 'plain-split'"),
        (
            "adapter.method=dora",
            r"adapter\.method: unknown adapter method 'dora'; accepted: full, lora",
        ),
        ("adapter.rank=0", r"adapter\.rank"),
        ("data.test_fraction=1.5", r"data\.test_fraction"),
    ],
)
def test_bad_fields_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epochs=0", "train.batch_size=0"])
    assert len(err.value.problems) == 2


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("mode: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["no-equals-sign"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), RunConfig)


def test_configs_exist():
    assert CONFIGS, "configs/ must ship at least one YAML preset"


REAL_LM_CONFIGS = [
    p
    for p in CONFIGS
    if (c := load_config(p)).model.task == "causal-lm" and c.model.name == "smollm2"
]


@pytest.mark.parametrize("path", REAL_LM_CONFIGS, ids=lambda p: p.name)
def test_real_llm_configs_report_both_answer_evaluations(path):
    """The smollm2 accuracy runs report log-likelihood scoring *and* parsed greedy generations.

    ``train.eval_generation`` defaults to off (generation is slow without a KV cache); a
    results config that leaves it off writes no ``gen_accuracy`` / ``gen_invalid_rate``.
    """
    cfg = load_config(path)
    assert cfg.train.eval_generation, f"{path.name}: set train.eval_generation: true"
    assert cfg.train.zero_shot, f"{path.name}: set train.zero_shot: true (the baseline row)"


def test_real_llm_configs_exist():
    names = {p.name for p in REAL_LM_CONFIGS}
    assert {"lora_smollm2_abstracts.yaml", "lora_smollm2_pubmedqa.yaml"} <= names
