"""A secure-fedavg server interrupted between rounds resumes from its sealed state.

The recipe on a tiny model: a run that crashes after round 2 (an interrupt raised when round 2
is aggregated) and is resumed for round 3 ends with the same global adapter and the same
round-3 metrics as an uninterrupted 3-round run with the same seeds; a tampered or rolled-back
sealed file is refused and leaves the run folder as it was.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from _tiny import table_overrides
from safetensors.torch import load_file

from shieldtune.config import load_config
from shieldtune.errors import ConfigError, SealingError
from shieldtune.recipes.federated import run_federated

pytestmark = pytest.mark.slow


def _cfg(out: Path, table: Path, name: str, rounds: int, *extra: str):
    return load_config(
        None,
        [
            *table_overrides(table),
            "data.max_length=32",
            "model.name=tiny-llama",
            "train.batch_size=16",
            "train.lr=0.0005",
            "mode=secure-fedavg",
            "federated.num_clients=2",
            "federated.min_clients=2",
            f"federated.rounds={rounds}",
            "federated.allow_simulated=true",
            f"output_dir={out}",
            f"run_name={name}",
            *extra,
        ],
    )


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def platform(tmp_path, monkeypatch):
    monkeypatch.setenv("SHIELDTUNE_SIM_PLATFORM_KEY", str(tmp_path / "platform" / "key"))


def _crash_after(round_: int):
    def on_progress(info: dict) -> None:
        if info["step"] == round_:
            raise KeyboardInterrupt  # the server dies right after round 2 was aggregated

    return on_progress


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, keyword_table, platform):
    # Prepare: an uninterrupted 3-round run
    out = tmp_path / "runs"
    full = run_federated(_cfg(out, keyword_table, "full", 3))
    # Execute: the same run, crashed after round 2, then resumed
    with pytest.raises(KeyboardInterrupt):
        run_federated(_cfg(out, keyword_table, "crashed", 3), on_progress=_crash_after(2))
    partial = out / ".partial-crashed"
    assert (partial / "server_state.sealed").is_file() and not (out / "crashed").exists()
    assert [m["step"] for m in _metrics(partial) if m["kind"] == "train"] == [1, 2]
    resumed = run_federated(_cfg(out, keyword_table, "crashed", 3), resume=partial)
    # Assert: same global adapter (as client 0 received it after round 3), same round-3 metrics
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    full_eval = {m["step"]: m for m in _metrics(full) if m["kind"] == "eval"}
    lines = _metrics(resumed)
    resumed_eval = {m["step"]: m for m in lines if m["kind"] == "eval"}
    assert sorted(resumed_eval) == [1, 3]  # round 2's evaluation was cut off by the crash
    for step in (1, 3):
        assert resumed_eval[step]["loss"] == pytest.approx(full_eval[step]["loss"], abs=1e-6)
        assert resumed_eval[step]["accuracy"] == full_eval[step]["accuracy"]
    # no update lost or applied twice: one aggregation per round, round 3 exactly once
    assert [m["step"] for m in lines if m["kind"] == "train"] == [1, 2, 3]
    assert [m["round"] for m in lines if m["kind"] == "resumed"] == [2]
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_after_round"] == 2 and [h["step"] for h in summary["history"]] == [1, 3]
    assert not partial.exists()


def test_tampered_or_rolled_back_sealed_state_is_refused(tmp_path, keyword_table, platform):
    # Prepare: a run crashed after round 1, and a copy of its round-1 sealed state
    out = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        run_federated(_cfg(out, keyword_table, "r", 2), on_progress=_crash_after(1))
    partial = out / ".partial-r"
    sealed = partial / "server_state.sealed"
    round1 = sealed.read_bytes()
    # Execute / Assert: one flipped bit is refused, and nothing in the folder changes
    tampered = bytearray(round1)
    tampered[-5] ^= 0x01
    sealed.write_bytes(bytes(tampered))
    before = _snapshot(partial)
    with pytest.raises(SealingError, match="failed authentication"):
        run_federated(_cfg(out, keyword_table, "r", 2), resume=partial)
    assert _snapshot(partial) == before
    assert sorted(p.name for p in out.iterdir()) == [".partial-r"]
    # the intact state resumes; afterwards the round-1 copy is an old one: a rollback
    sealed.write_bytes(round1)
    done = run_federated(_cfg(out, keyword_table, "r", 2), resume=partial)
    (done / "server_state.sealed").write_bytes(round1)
    before = _snapshot(done)
    with pytest.raises(SealingError, match="rolled-back"):
        run_federated(_cfg(out, keyword_table, "r", 3), resume=done)
    assert _snapshot(done) == before and sorted(p.name for p in out.iterdir()) == ["r"]


def test_resume_refuses_other_configs_and_plain_runs(tmp_path, keyword_table, platform):
    out = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        run_federated(_cfg(out, keyword_table, "r", 2), on_progress=_crash_after(1))
    partial = out / ".partial-r"
    before = _snapshot(partial)
    with pytest.raises(ConfigError, match="train.lr"):
        run_federated(_cfg(out, keyword_table, "r", 2, "train.lr=0.1"), resume=partial)
    with pytest.raises(ConfigError, match="only secure-fedavg"):
        run_federated(_cfg(out, keyword_table, "r", 2, "mode=plain-fedavg"), resume=partial)
    with pytest.raises(ConfigError, match="completed 1 round"):
        run_federated(_cfg(out, keyword_table, "r", 1), resume=partial)
    assert _snapshot(partial) == before
    shutil.rmtree(partial)
    with pytest.raises(ConfigError, match="no run folder"):
        run_federated(_cfg(out, keyword_table, "r", 2), resume=partial)
