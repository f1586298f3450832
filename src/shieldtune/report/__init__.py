"""Reports: plots and human-readable summaries of run folders and experiment folders."""

from shieldtune.report.experiment import write_report
from shieldtune.report.plots import plot_metrics

__all__ = ["plot_metrics", "write_report"]
