"""Training components shared by every recipe: task loss, evaluation, run folder, progress."""

from shieldtune.training.evaluate import evaluate
from shieldtune.training.loop import FitResult, fit
from shieldtune.training.losses import task_loss
from shieldtune.training.rundir import RunDir
from shieldtune.training.steps import Optim, autocast, make_optim

__all__ = ["evaluate", "fit", "FitResult", "task_loss", "RunDir", "Optim", "autocast", "make_optim"]
