"""Several split clients on one shared server adapter, with DP clipping of the SPF deltas:
split equals plain-split when the clients take turns (Flower ``workers: 1``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from shieldtune.adapters.spf import DELTA_FILE, SparseDelta
from shieldtune.recipes import RECIPES

from .conftest import client_losses, multi_config

pytestmark = pytest.mark.integration
CLIP = 0.02


def test_shared_adapter_with_clients_in_turn_equals_plain_split(
    tmp_path: Path, multi_table: Path, platform_key: Path
) -> None:
    # Prepare: the same run in both modes; the DP clip binds (no noise: σ = 0)
    runs = {}
    for mode in ("plain-split", "split"):
        cfg = multi_config(
            tmp_path,
            multi_table,
            f"mode={mode}",
            f"run_name={mode}",
            "split.server_adapter=shared",
            "federated.workers=1",
            f"split.dp_clip={CLIP}",
        )
        # Execute
        runs[mode] = RECIPES[mode](cfg)
    # Assert: same losses step for step, same evaluations, same aggregated (clipped) delta
    plain, split = runs["plain-split"], runs["split"]
    p_losses, s_losses = client_losses(plain), client_losses(split)
    assert set(p_losses) == set(s_losses) and p_losses
    for key, loss in p_losses.items():
        assert s_losses[key] == pytest.approx(loss, abs=1e-5), key
    p = json.loads((plain / "summary.json").read_text())
    s = json.loads((split / "summary.json").read_text())
    for a, b in zip(p["history"], s["history"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["accuracy"] == a["accuracy"]
    d_plain = SparseDelta.load(plain / "front_adapter" / DELTA_FILE)
    d_split = SparseDelta.load(split / "front_adapter" / DELTA_FILE)
    for name, entry in d_plain.entries.items():
        assert torch.equal(d_split.entries[name].indices, entry.indices), name
        torch.testing.assert_close(d_split.entries[name].values, entry.values, atol=1e-6, rtol=0)
    # the clip bound the global delta: each round moves it by at most CLIP (2 rounds)
    norm = math.sqrt(sum(float(e.values.double().pow(2).sum()) for e in d_split.entries.values()))
    assert 0 < norm <= 2 * CLIP + 1e-6
    # one shared adapter: every committed step of every client counted once
    assert s["server_steps"] == sum(s["client_steps"]) == len(s_losses)
    assert s["dp_clip"] == CLIP and s["server_adapter"] == "shared"
    assert not [e for e in s["events"] if e["kind"] == "after_train"]  # nothing to average
