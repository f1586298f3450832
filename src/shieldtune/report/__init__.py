"""Reports: plots and human-readable summaries of run folders."""

from shieldtune.report.plots import plot_metrics

__all__ = ["plot_metrics"]
