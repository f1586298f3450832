"""Recipes: one explicit setup -> train -> save -> cleanup loop per mode."""

from shieldtune.recipes.federated import run_federated
from shieldtune.recipes.local_finetune import run_local
from shieldtune.recipes.plain_split import run_plain_split, split_step
from shieldtune.recipes.shielded import run_shielded
from shieldtune.recipes.split_secure import run_split_secure

RECIPES = {
    "local": run_local,
    "plain-split": run_plain_split,
    "split": run_split_secure,
    "plain-fedavg": run_federated,
    "secure-fedavg": run_federated,
    "shielded-fedavg": run_federated,
    "shielded": run_shielded,
}

__all__ = [
    "RECIPES",
    "run_federated",
    "run_local",
    "run_plain_split",
    "run_shielded",
    "run_split_secure",
    "split_step",
]
