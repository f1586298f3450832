"""Experiments: a grid of datasets × rows (methods) × seeds, run through the recipes, one table.

``shieldtune experiment CONFIG`` runs :func:`run_experiment` on :func:`load_experiment`'s
plan; ``shieldtune report DIR`` turns the experiment folder into a page
(:mod:`shieldtune.report.experiment`).
"""

from shieldtune.experiments.config import (
    Cell,
    DatasetSpec,
    ExperimentConfig,
    ExperimentPlan,
    RowSpec,
    load_experiment,
    merge_overrides,
    plan_experiment,
)
from shieldtune.experiments.results import bytes_sent, summarise, write_results
from shieldtune.experiments.runner import check_resumable, run_experiment

__all__ = [
    "Cell",
    "DatasetSpec",
    "ExperimentConfig",
    "ExperimentPlan",
    "RowSpec",
    "bytes_sent",
    "check_resumable",
    "load_experiment",
    "merge_overrides",
    "plan_experiment",
    "run_experiment",
    "summarise",
    "write_results",
]
