"""Figures of an experiment report as PNG bytes (matplotlib, no display needed)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

__all__ = ["curves_figure", "leakage_figure"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")  # keeps outside legends
    _plt().close(fig)
    return buf.getvalue()


def curves_figure(title: str, runs: Sequence[dict[str, Any]]) -> bytes:
    """Training loss per step and test accuracy per epoch of every run of one dataset.

    Args:
        title: Figure title (the dataset).
        runs: ``{"row", "seed", "train": [(step, loss)], "eval": [(epoch, accuracy)]}``; one
            colour per row, one line per seed.

    Returns:
        The PNG.
    """
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 3.6))
    rows = list(dict.fromkeys(r["row"] for r in runs))
    colours = plt.get_cmap("tab10")
    for run in runs:
        colour = colours(rows.index(run["row"]) % 10)
        label = run["row"] if run is next(r for r in runs if r["row"] == run["row"]) else None
        if run["train"]:
            x, y = zip(*run["train"], strict=True)
            marker = "o" if len(x) <= 20 else None  # a 1-round federation is one point
            ax_loss.plot(x, y, color=colour, alpha=0.8, lw=1.2, ms=3, marker=marker, label=label)
        if run["eval"]:
            x, y = zip(*run["eval"], strict=True)
            ax_acc.plot(x, y, "o-", color=colour, alpha=0.8, lw=1.2, ms=3, label=label)
    ax_loss.set_xlabel("step (federated: round)")
    ax_loss.set_ylabel("training loss")
    ax_acc.set_xlabel("epoch (federated: round)")
    ax_acc.set_ylabel("test accuracy")
    for ax, key in ((ax_loss, "train"), (ax_acc, "eval")):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        xs = {x for run in runs for x, _ in run[key]}
        if len(xs) == 1:  # one epoch or round: centre it instead of a 0.95..1.05 axis
            (x,) = xs
            ax.set_xlim(x - 0.5, x + 0.5)
            ax.set_xticks([x])
    handles, labels = ax_acc.get_legend_handles_labels()
    if not handles:
        handles, labels = ax_loss.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9)
    fig.suptitle(f"{title}: one colour per row, one line per seed")
    return _png(fig)


def leakage_figure(rows: Sequence[dict[str, Any]], metric: str = "token_recovery") -> bytes:
    """Leakage against the cut layer: one line per (attack, mode), its chance level dashed.

    Args:
        rows: Attack rows (``attack, mode, cut, metric, value, chance``) with a cut.
        metric: Which metric to plot.

    Returns:
        The PNG.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    chosen = [r for r in rows if r.get("metric") == metric and r.get("cut") is not None]
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in chosen:
        series.setdefault((str(r["attack"]), str(r["mode"])), []).append(r)
    colours = plt.get_cmap("tab10")
    for i, ((attack, mode), points) in enumerate(sorted(series.items())):
        points.sort(key=lambda r: r["cut"])
        cuts = [p["cut"] for p in points]
        ax.plot(
            cuts,
            [p["value"] for p in points],
            "o-",
            color=colours(i % 10),
            label=f"{attack} · {mode}",
        )
        if all(p.get("chance") is not None for p in points):
            ax.plot(cuts, [p["chance"] for p in points], "--", color=colours(i % 10), alpha=0.5)
    ax.set_xticks(sorted({r["cut"] for r in chosen}))
    ax.set_xlabel("cut layer (layers run by the client)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(f"{metric.replace('_', ' ')} by cut layer (dashed: chance)")
    return _png(fig)
