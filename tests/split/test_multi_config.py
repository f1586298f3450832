"""Settings of split runs with several clients: one client is today's run, bad combinations
are refused naming the field, the aggregation enclave's measured config carries the sparse/DP
settings, and rounds run without a front adapter and with DP noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shieldtune.config import load_config
from shieldtune.errors import ConfigError
from shieldtune.federated.deploy import client_policy, enclave_config, enclave_program
from shieldtune.recipes import RECIPES
from shieldtune.split.service import program_config
from shieldtune.tee.program import measure_program

from .conftest import multi_config, read_metrics

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "split"


def test_one_client_is_the_default_and_the_shared_server() -> None:
    cfg = load_config(None, ["mode=split"])
    assert cfg.split.clients == 1 and cfg.split.server_adapter == "shared"
    assert cfg.split.dp_clip is None and cfg.split.dp_sigma == 0.0
    assert program_config(
        model="m", task="seq-cls", num_labels=2, cut=1, adapter={"method": "lora"}, lr=0.1,
        train=cfg.train, seed=0, total_steps=1,
    )["server_adapter"] == "shared"  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["split.clients=0"], r"split\.clients: Input should be greater than or equal to 1"),
        (["split.clients=2", "split.dp_sigma=1.0"], r"split\.dp_sigma is 1\.0 but split\.dp_clip"),
        (["split.dp_clip=-1"], r"split\.dp_clip: Input should be greater than 0"),
        (["split.dp_sigma=-0.5"], r"split\.dp_sigma: Input should be greater than or equal to 0"),
        (["split.server_adapter=per_client"], r"'per_client' needs split\.clients > 1"),
        (["split.server_adapter=mine"], r"split\.server_adapter: Input should be 'shared'"),
        (["split.dp_clip=1.0"], r"split\.dp_clip / split\.dp_sigma: DP applies to .*clients > 1"),
        (
            ["mode=split", "split.clients=2", "federated.min_clients=3"],
            r"federated\.min_clients \(3\) exceeds split\.clients \(2\)",
        ),
        (
            ["mode=plain-split", "split.clients=2", "split.front_adapter={method: lora}"],
            r"split\.front_adapter\.method: 'lora' cannot be averaged",
        ),
    ],
)
def test_bad_combinations_are_refused_naming_the_field(overrides: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_the_aggregation_enclave_measures_the_sparse_and_dp_settings() -> None:
    plain = load_config(None, ["mode=secure-fedavg"])
    split = load_config(None, ["mode=split", "split.clients=2", "split.dp_clip=0.5"])
    noisy = load_config(
        None, ["mode=split", "split.clients=2", "split.dp_clip=0.5", "split.dp_sigma=1.0"]
    )
    assert set(enclave_config(plain)) == {"max_update_bytes", "min_updates"}
    assert enclave_config(split) == {**enclave_config(plain), "dp_clip": 0.5, "dp_sigma": 0.0}
    assert enclave_program(split) == "fedavg-sparse" and enclave_program(plain) == "fedavg"
    # a client that expects other DP settings refuses this enclave (another measurement)
    ours = client_policy(noisy).allowed_measurements
    assert ours != client_policy(split).allowed_measurements
    assert ours == [measure_program("fedavg-sparse", enclave_config(noisy))]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_split_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.mode in ("split", "plain-split")


def test_rounds_run_without_a_front_adapter_and_with_dp_noise(
    tmp_path: Path, multi_table: Path
) -> None:
    # Prepare: LoRA on the back only (nothing to aggregate but the per_client adapters)...
    bare = multi_config(
        tmp_path, multi_table, "mode=plain-split", "run_name=bare", "split.front_adapter=null",
        "split.server_adapter=per_client", "federated.rounds=1",
    )  # fmt: skip
    # ...and SPF with DP noise on the deltas
    noisy = multi_config(
        tmp_path, multi_table, "mode=plain-split", "run_name=noisy", "split.dp_clip=0.05",
        "split.dp_sigma=1.0", "federated.rounds=1",
    )  # fmt: skip
    # Execute
    runs = {name: RECIPES["plain-split"](cfg) for name, cfg in (("bare", bare), ("noisy", noisy))}
    # Assert: both rounds aggregated and evaluated; the bare run sent empty updates
    for name, run in runs.items():
        kinds = [r["kind"] for r in read_metrics(run)]
        assert "train" in kinds and "eval" in kinds and "round_failed" not in kinds, name
    bare_summary = json.loads((runs["bare"] / "summary.json").read_text())
    assert bare_summary["client_trainable_params"] == 0 and bare_summary["front_method"] is None
    assert [e["averaged"] for e in bare_summary["events"] if e["kind"] == "after_train"] == [2]
    assert not (runs["bare"] / "front_adapter").exists()
    assert json.loads((runs["noisy"] / "summary.json").read_text())["dp_sigma"] == 1.0
