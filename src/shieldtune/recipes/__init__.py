"""Recipes: one explicit setup -> train -> save -> cleanup loop per mode."""

from shieldtune.recipes.local_finetune import run_local
from shieldtune.recipes.plain_split import run_plain_split, split_step

RECIPES = {"local": run_local, "plain-split": run_plain_split}

__all__ = ["RECIPES", "run_local", "run_plain_split", "split_step"]
