"""The ``shielded`` recipe end to end: CLI, enclave process, worker process, sealed adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _tiny import table_overrides
from typer.testing import CliRunner

from shieldtune.cli.app import app
from shieldtune.config import load_config
from shieldtune.errors import ExitCode
from shieldtune.recipes.shielded import open_party, party_config
from shieldtune.shielded.program import PROGRAM_NAME
from shieldtune.tee.audit import AuditLog
from shieldtune.tee.program import measured_modules


def _args(out: Path, table: Path, *extra: str) -> list[str]:
    overrides = [
        *table_overrides(table),
        "mode=shielded",
        "model.name=tiny-llama",
        "data.max_length=24",
        "data.max_test_examples=16",
        "adapter={method: lora, rank: 4}",
        "train.batch_size=8",
        "train.max_steps=6",
        "train.lr=0.003",
        f"output_dir={out}",
        *extra,
    ]
    return ["train", *[arg for o in overrides for arg in ("--set", o)]]


@pytest.mark.integration
def test_shielded_run_from_the_cli(tmp_path: Path, keyword_table: Path, platform_key: Path) -> None:
    result = CliRunner().invoke(
        app, _args(tmp_path, keyword_table, "shielded.allow_simulated=true", "shielded.capture=4")
    )
    assert result.exit_code == 0, result.output
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mode"] == "shielded" and "simulated" in summary["tee"]
    assert summary["steps"] == 6 and summary["offload_products"] > 0
    assert (run / "adapter.sealed").is_file() and not (run / "adapter").exists()
    seen = AuditLog.read_jsonl(run / "accelerator_audit.jsonl")
    assert seen and all(c.protection == "masked" for c in seen)
    host = AuditLog.read_jsonl(run / "enclave_audit.jsonl")
    assert [c for c in host if c.call == "channel_call" and c.protection == "encrypted"]
    secret = {"input_ids", "attention_mask", "labels", "logits"}
    clear = [t.name for c in host if c.protection == "clear" for t in c.tensors]
    assert not secret & set(clear), clear  # only public handshake and launch data are clear
    assert len(list((run / "accelerator_view").glob("*.safetensors"))) == 4


def test_simulated_enclave_refused_without_opt_in(tmp_path: Path, keyword_table: Path) -> None:
    result = CliRunner().invoke(app, _args(tmp_path, keyword_table))
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert "SIMULATED" in result.output
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]


@pytest.mark.integration
def test_every_module_the_enclave_runs_is_measured(
    tmp_path: Path, keyword_table: Path, platform_key: Path
) -> None:
    cfg = load_config(None, _args(tmp_path, keyword_table, "shielded.allow_simulated=true")[2::2])
    config = party_config(cfg, 2, 6)
    with open_party(config, allow_simulated=True) as party:
        loaded = set(party.info["modules"])
    assert "shieldtune.shielded.engine" in loaded
    assert loaded <= set(measured_modules(PROGRAM_NAME)), loaded - set(
        measured_modules(PROGRAM_NAME)
    )
