"""``shieldtune demo``: a short but real job — LoRA on the real MiniLM for medical abstracts."""

from __future__ import annotations

import json

from shieldtune.cli._common import console, quiet_libraries
from shieldtune.cli.train import run_and_report
from shieldtune.config import load_config
from shieldtune.data.builtin import resolve_data_dir
from shieldtune.errors import DataError

__all__ = ["demo_command"]


def demo_command(output_dir: str, max_train: int | None, epochs: int) -> int:
    """Fine-tune LoRA on ``minilm``: medical abstracts if ../shared/data exists, else the
    project's built-in medical-style sample; print the test accuracy."""
    quiet_libraries()
    try:
        resolve_data_dir(None)
        dataset = "medical_abstracts"
    except DataError:
        dataset = "medical_sample"
        console.print("[yellow]../shared/data not found: using the built-in medical sample[/]")
    overrides = [
        f"data.dataset={dataset}",
        f"output_dir={output_dir}",
        f"train.epochs={epochs}",
        "train.lr=0.001",
        "adapter.rank=8",
        "adapter.alpha=16",
    ]
    if max_train:
        overrides.append(f"data.max_train_examples={max_train}")
    cfg = load_config(None, overrides)
    console.print(
        f"demo: local LoRA on minilm (all-MiniLM-L6-v2) · dataset {dataset} · {epochs} epoch(s)"
    )
    run_dir = run_and_report(cfg)
    acc = json.loads((run_dir / "summary.json").read_text())["accuracy"]
    console.print(f"[bold green]test accuracy: {acc:.4f}[/]")
    return 0
