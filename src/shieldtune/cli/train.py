"""``shieldtune train CONFIG``: run one recipe from a YAML config (+ overrides)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from shieldtune.cli._common import console, progress_bar, quiet_libraries
from shieldtune.config import RunConfig, load_config
from shieldtune.errors import ConfigError

__all__ = ["train_command", "run_and_report", "print_summary", "EPILOG"]

EPILOG = """Examples:

  shieldtune train configs/local/lora_minilm.yaml --set train.epochs=1

  shieldtune train configs/federated/secure_fedavg_lora_minilm.yaml --resume runs/NAME
"""


def run_and_report(cfg: RunConfig, resume: Path | None = None) -> Path:
    """Run the config's recipe with a progress bar; print the final metrics table.

    Args:
        cfg: The run config.
        resume: An interrupted secure-fedavg run folder to continue (``--resume``).
    """
    from shieldtune.recipes import RECIPES

    label = f"{cfg.mode} · {cfg.model.name} · {cfg.adapter['method']}"
    with progress_bar(label) as update:
        if resume is not None:
            from shieldtune.recipes.federated import run_federated

            run_dir = run_federated(cfg, on_progress=update, resume=resume)
        else:
            run_dir = RECIPES[cfg.mode](cfg, on_progress=update)
    print_summary(cfg, run_dir)
    return run_dir


def print_summary(cfg: RunConfig, run_dir: Path) -> None:
    """Print a run folder's final metrics table and its path."""
    summary = json.loads((run_dir / "summary.json").read_text())
    where = summary.get("dataset", f"{summary.get('clients', '?')} clients")
    table = Table(title=f"{cfg.mode} on {where}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "accuracy",
        "macro_f1",
        "loss",
        "perplexity",
        "steps",
        "train_time_s",
        "samples_per_s",
    ):
        if key in summary:
            value = summary[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"run folder: [bold]{run_dir}[/]")


def train_command(config: Path | None, overrides: list[str], resume: Path | None = None) -> int:
    """Validate the config, then run it.

    Args:
        config: YAML file (None = built-in defaults).
        overrides: ``key.path=value`` strings applied after the file.
        resume: An interrupted secure-fedavg run folder to continue.

    Returns:
        Exit code 0.
    """
    cfg = load_config(config, overrides)  # validated once, at the edge
    if resume is not None and cfg.mode != "secure-fedavg":
        raise ConfigError(
            f"--resume: only secure-fedavg keeps a sealed server state (mode is {cfg.mode})"
        )
    quiet_libraries()
    run_and_report(cfg, resume)
    return 0
