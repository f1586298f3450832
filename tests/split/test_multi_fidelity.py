"""Several split clients, per_client server adapters: split (two enclaves, gRPC, Flower with
sealed deltas) equals plain-split (the same code in process) step for step, and nothing
secret crosses a host in the clear."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from shieldtune.adapters.spf import DELTA_FILE, SparseDelta
from shieldtune.recipes import RECIPES
from shieldtune.recipes.split_federated import run_split_federated
from shieldtune.split.service import SIMULATED_TEE
from shieldtune.tee.audit import AuditLog

from .conftest import client_losses, multi_config, read_metrics

pytestmark = pytest.mark.integration
CLEAR_OK = {"config", "sealing_key", "hello", "enclave_public", "report_data"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, multi_table: Path, platform_key: Path):
    """plain-split and split, 2 clients × 2 rounds, per_client; the Flower traffic of both."""
    out = tmp_path_factory.mktemp("runs")
    wire: dict[str, list[str]] = {"plain-split": [], "split": []}
    done = {}
    for mode in ("plain-split", "split"):

        def tap(msg: Any, seen: list[str] = wire[mode]) -> None:
            if msg.has_content():
                for rec in msg.content.array_records.values():
                    seen.extend(str(a.numpy().dtype) for a in rec.values())

        cfg = multi_config(
            out,
            multi_table,
            f"mode={mode}",
            f"run_name={mode}",
            "split.server_adapter=per_client",
        )
        done[mode] = run_split_federated(cfg, tap=tap)
    return done, wire


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def test_split_equals_plain_split_per_client_step_for_step(runs: Any) -> None:
    done, _ = runs
    plain, split = done["plain-split"], done["split"]
    # every client's every step: same loss
    p_losses, s_losses = client_losses(plain), client_losses(split)
    assert set(p_losses) == set(s_losses)
    assert {(c, r) for c, r, _ in p_losses} == {(0, 1), (0, 2), (1, 1), (1, 2)}
    for key, loss in p_losses.items():
        assert s_losses[key] == pytest.approx(loss, abs=1e-5), key
    # the same global model after every round (evaluated through the same path)
    p, s = _summary(plain), _summary(split)
    for a, b in zip(p["history"], s["history"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["accuracy"] == a["accuracy"]
    assert [h["step"] for h in s["history"]] == [1, 2]
    # the same aggregated SPF delta, on the union of the clients' masks
    d_plain = SparseDelta.load(plain / "front_adapter" / DELTA_FILE)
    d_split = SparseDelta.load(split / "front_adapter" / DELTA_FILE)
    assert d_plain.entries.keys() == d_split.entries.keys()
    for name, entry in d_plain.entries.items():
        assert torch.equal(d_split.entries[name].indices, entry.indices), name
        torch.testing.assert_close(d_split.entries[name].values, entry.values, atol=1e-6, rtol=0)
    # per_client server adapters were averaged after each round, every step counted once
    averaged = [e for e in s["events"] if e["kind"] == "after_train"]
    assert [e["averaged"] for e in averaged] == [2, 2]
    assert s["server_steps"] == sum(s["client_steps"]) == p["server_steps"] == len(p_losses)
    for key in ("server_trainable_params", "client_trainable_params", "client_train_rows"):
        assert s[key] == p[key]
    assert s["server_adapter"] == "per_client" and s["clients"] == 2


def test_learning_happens_and_the_run_folders_have_their_layout(runs: Any) -> None:
    done, _ = runs
    plain, split = done["plain-split"], done["split"]
    history = _summary(split)["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert all("macro_f1_client_mean" in h for h in history)  # the whole split's macro-F1
    train = [r for r in read_metrics(split) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for run in (plain, split):
        for name in ("config.yaml", "metrics.jsonl", "curves.png", "summary.json"):
            assert (run / name).is_file()
    assert (plain / "back_adapter" / "adapter_model.safetensors").is_file()
    assert (split / "back_adapter.sealed").is_file() and not (split / "back_adapter").exists()
    s = _summary(split)
    assert s["tee"] == s["aggregation_tee"] == SIMULATED_TEE
    assert s["wire_bytes_per_step"] > 0 and s["bytes_to_server_per_round"] > 0


def test_nothing_secret_crosses_either_host_in_the_clear(runs: Any) -> None:
    done, wire = runs
    split = done["split"]
    # Flower carried only ciphertext in split (plain-split: the deltas themselves)
    assert set(wire["split"]) == {"uint8"}
    assert {"int64", "float32"} <= set(wire["plain-split"])
    # both enclave boundaries: encrypted records, or clear calls without secret tensors
    for name in ("enclave_audit.jsonl", "audit.jsonl"):
        crossings = AuditLog.read_jsonl(split / name)
        assert crossings
        for c in crossings:
            if c.protection == "clear":
                assert {t.name for t in c.tensors} <= CLEAR_OK, c
            if c.call == "channel_call":
                assert c.protection == "encrypted" and [t.name for t in c.tensors] == ["record"]
    calls = {c.call for c in AuditLog.read_jsonl(split / "enclave_audit.jsonl")}
    assert {"channel_call", "average", "checkpoint"} <= calls  # the host's calls, no tensors
    assert not list(split.rglob("adapter_model.safetensors"))


def test_split_with_several_clients_dispatches_from_both_recipes() -> None:
    assert RECIPES["split"].__name__ == "run_split_secure"
    assert RECIPES["plain-split"].__name__ == "run_plain_split"
