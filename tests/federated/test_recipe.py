"""plain-fedavg / secure-fedavg recipes end to end on a tiny model (Flower, in-process grid)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny import table_overrides

from shieldtune.config import load_config
from shieldtune.errors import ConfigError
from shieldtune.federated.partition import client_shares
from shieldtune.recipes import RECIPES
from shieldtune.tee.audit import AuditLog

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "federated"


def _cfg(tmp_path, table, *extra):
    return load_config(
        None,
        [
            *table_overrides(table),
            "data.max_length=48",
            "model.name=tiny-llama",
            "train.batch_size=16",
            "train.lr=0.0005",
            "federated.num_clients=3",
            "federated.local_epochs=1",
            "federated.allow_simulated=true",
            f"output_dir={tmp_path}",
            *extra,
        ],
    )


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, keyword_table, monkeypatch_module):
    """One plain and one secure run with the same seeds (4 rounds, 3 clients)."""
    key = tmp_path_factory.mktemp("platform") / "sim_platform_key"
    monkeypatch_module.setenv("SHIELDTUNE_SIM_PLATFORM_KEY", str(key))
    out = tmp_path_factory.mktemp("runs")
    done = {}
    for mode in ("plain-fedavg", "secure-fedavg"):
        cfg = _cfg(out, keyword_table, f"mode={mode}", "federated.rounds=4", f"run_name={mode}")
        done[mode] = RECIPES[mode](cfg)
    return done


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_three_clients_learn_over_rounds(runs):
    # Execute: see the fixture
    run = runs["plain-fedavg"]
    summary = _summary(run)
    history = summary["history"]
    # Assert: global test accuracy rises over the rounds, loss falls, round by round
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["accuracy"] > history[0]["accuracy"]
    assert history[-1]["accuracy"] >= 0.9
    assert all(b["loss"] < a["loss"] for a, b in zip(history, history[1:], strict=False))
    assert summary["examples"] == summary["test_rows"]  # evaluated on the whole test split
    # the clients sent their shares' confusion matrices: macro-F1 is the whole split's
    assert all("macro_f1_client_mean" in h and 0 <= h["macro_f1"] <= 1 for h in history)
    assert sum(summary["client_train_rows"]) == summary["train_rows"]
    for name in ("config.yaml", "metrics.jsonl", "curves.png"):
        assert (run / name).is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert summary["bytes_to_client_per_round"] > 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x["loss"] for x in lines if x["kind"] == "train"]
    assert len(train) == 4 and all(0 < x < 5 for x in train)


def test_secure_fedavg_matches_plain_and_keeps_adapters_encrypted(runs):
    plain, secure = _summary(runs["plain-fedavg"]), _summary(runs["secure-fedavg"])
    for p, s in zip(plain["history"], secure["history"], strict=True):
        assert s["loss"] == pytest.approx(p["loss"], abs=1e-6)
        assert s["accuracy"] == p["accuracy"]
    assert secure["simulated_enclave"] is True and secure["sealed_round"] >= 1
    run = runs["secure-fedavg"]
    assert (run / "server_state.sealed").is_file()
    crossings = AuditLog.read_jsonl(run / "audit.jsonl")
    clear = {t.name for c in crossings if c.protection == "clear" for t in c.tensors}
    assert clear <= {"config", "sealing_key", "hello", "enclave_public", "report_data"}
    assert {c.call for c in crossings if c.protection == "encrypted"} >= {"channel_call"}
    # the exported adapters are the same
    from safetensors.torch import load_file

    a = load_file(runs["plain-fedavg"] / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("adapter", ["prefix", "spf"])
def test_other_adapters_federate(tmp_path, keyword_table, adapter):
    extra = ["adapter.saliency=magnitude", "adapter.density=0.05"] if adapter == "spf" else []
    cfg = _cfg(
        tmp_path,
        keyword_table,
        "mode=plain-fedavg",
        "federated.rounds=1",
        "federated.partition=dirichlet",
        "federated.alpha=1.0",
        f"adapter.method={adapter}",
        *extra,
        "run_name=r",
    )
    summary = _summary(RECIPES["plain-fedavg"](cfg))
    assert summary["method"] == adapter and len(summary["history"]) == 1
    assert summary["partition"] == "dirichlet(alpha=1.0)"


def test_secure_fedavg_on_a_simulated_enclave_needs_explicit_opt_in(tmp_path, keyword_table):
    cfg = _cfg(tmp_path, keyword_table, "mode=secure-fedavg", "federated.allow_simulated=false")
    with pytest.raises(ConfigError, match="allow_simulated"):
        RECIPES["secure-fedavg"](cfg)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_federated_spf_refuses_gradient_saliency(tmp_path, keyword_table):
    cfg = _cfg(tmp_path, keyword_table, "mode=plain-fedavg", "adapter.method=spf")
    with pytest.raises(ConfigError, match="same mask"):
        RECIPES["plain-fedavg"](cfg)


def test_without_eval_confusion_macro_f1_is_the_clients_mean(tmp_path, keyword_table):
    # federated.eval_confusion=false: no per-class counts leave the clients
    extra = ("mode=plain-fedavg", "federated.rounds=1", "federated.eval_confusion=false")
    (last,) = _summary(RECIPES["plain-fedavg"](_cfg(tmp_path, keyword_table, *extra)))["history"]
    assert 0 <= last["macro_f1"] <= 1 and "macro_f1_client_mean" not in last


def test_config_validation():
    with pytest.raises(ConfigError, match="min_clients"):
        load_config(None, ["federated.num_clients=2", "federated.min_clients=3"])
    with pytest.raises(ConfigError, match="partition"):
        load_config(None, ["federated.partition=zipf"])


def test_client_shares_are_disjoint_and_cover_both_splits():
    labels = [i % 3 for i in range(60)]
    for partition in ("iid", "dirichlet"):
        shares = client_shares(labels, 60, 15, 3, partition, 0.5, 0)
        train = sorted(i for tr, _ in shares for i in tr)
        test = sorted(i for _, te in shares for i in te)
        assert train == list(range(60)) and test == list(range(15))
    with pytest.raises(ConfigError, match="dirichlet"):
        client_shares(None, 60, 15, 3, "dirichlet", 0.5, 0)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_federated_configs_load(path):
    cfg = load_config(path)
    assert cfg.mode in ("plain-fedavg", "secure-fedavg")
