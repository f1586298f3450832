"""Training curves of a run folder as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["plot_metrics"]


def plot_metrics(metrics_file: Path, out: Path, title: str = "") -> Path:
    """Plot training loss per step and test metrics per epoch from ``metrics.jsonl``.

    Args:
        metrics_file: JSON lines with ``kind`` = ``train`` or ``eval``.
        out: PNG path to write.
        title: Figure title.

    Returns:
        ``out``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax_loss.plot(
            [r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="test loss"
        )
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    for key in ("accuracy", "macro_f1", "perplexity"):
        if evals and key in evals[0]:
            ax_eval.plot([r["epoch"] for r in evals], [r[key] for r in evals], "o-", label=key)
    ax_eval.set_xlabel("epoch")
    ax_eval.set_title("test metrics")
    ax_eval.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
