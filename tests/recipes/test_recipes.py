"""Recipes end to end on tiny models: they learn, save what they claim, and split is exact."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import padded_batch, table_overrides

from shieldtune.adapters.spf import DELTA_FILE, SparseDelta, apply_delta
from shieldtune.config import load_config
from shieldtune.models import load_model, slice_model
from shieldtune.recipes import run_local, run_plain_split, split_step
from shieldtune.training import task_loss


def _cfg(tmp_path, table, *extra):
    return load_config(
        None,
        [
            *table_overrides(table),
            "data.max_length=48",
            "model.name=tiny-llama",
            "train.batch_size=16",
            "train.lr=0.003",
            "train.log_every=2",
            f"output_dir={tmp_path}",
            *extra,
        ],
    )


@pytest.mark.parametrize("method", ["lora", "prefix", "full"])
def test_local_recipe_learns_and_writes_a_complete_run_folder(tmp_path, keyword_table, method):
    cfg = _cfg(tmp_path, keyword_table, f"adapter.method={method}", "train.epochs=6", "run_name=r")
    run = run_local(cfg)
    summary = json.loads((run / "summary.json").read_text())
    history = summary["history"]
    assert history[-1]["loss"] < history[0]["loss"]  # it learns
    if method == "full":
        assert summary["accuracy"] >= 0.9
    for name in ("config.yaml", "metrics.jsonl", "curves.png"):
        assert (run / name).is_file()
    assert any((run / "adapter").iterdir())
    assert not list(tmp_path.glob(".partial-*"))


def test_failed_run_never_looks_complete(tmp_path, keyword_table, monkeypatch):
    import shieldtune.recipes.local_finetune as local

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(local, "plot_metrics", boom)
    cfg = _cfg(tmp_path, keyword_table, "train.max_steps=2", "run_name=r")
    with pytest.raises(RuntimeError, match="disk full"):
        run_local(cfg)
    assert not (tmp_path / "r").exists()
    assert not (tmp_path / ".partial-r" / "summary.json").exists()


def test_split_step_gradients_equal_the_unsplit_model():
    model = load_model("tiny-qwen2", "seq-cls", num_labels=3).model.eval()
    ids, mask = padded_batch()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2])}
    task_loss(
        model(input_ids=ids, attention_mask=mask).logits, batch["labels"], "seq-cls"
    ).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    front, back = slice_model(model, 2)
    split_step(front, back, batch, "seq-cls", "float32", train_front=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-4, msg=n)


def test_plain_split_with_spf_changes_only_the_sparse_entries(tmp_path, keyword_table):
    cfg = _cfg(
        tmp_path,
        keyword_table,
        "mode=plain-split",
        "split.cut=2",
        "split.front_adapter={method: spf, density: 0.05}",
        "train.max_steps=4",
        "run_name=s",
    )
    run = run_plain_split(cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["front_method"] == "spf" and summary["client_trainable_params"] > 0
    assert (run / "back_adapter" / "adapter_model.safetensors").is_file()
    delta = SparseDelta.load(run / "front_adapter" / DELTA_FILE)
    assert delta.nnz == summary["client_trainable_params"]
    assert any(float(e.values.abs().max()) > 0 for e in delta.entries.values())
    # applying the delta to a fresh front slice changes exactly nnz entries
    fresh = load_model("tiny-llama", "seq-cls", num_labels=2).model
    front, _ = slice_model(fresh, 2)
    before = {n: p.detach().clone() for n, p in front.named_parameters()}
    apply_delta(front, delta)
    changed = sum(int((p != before[n]).sum()) for n, p in front.named_parameters())
    assert 0 < changed <= delta.nnz
