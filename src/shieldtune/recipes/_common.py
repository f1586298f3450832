"""Set-up every recipe shares: seeds, dataset, model, tokenised splits, run folder."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shieldtune.config import RunConfig, to_yaml
from shieldtune.data.builtin import BUILTIN_DATASETS, load_builtin
from shieldtune.data.splits import subset, train_test_split
from shieldtune.data.tables import Dataset, load_table
from shieldtune.data.tasks import encode_classification, encode_instruction
from shieldtune.errors import ConfigError
from shieldtune.models import LoadedModel, load_model
from shieldtune.training import RunDir
from shieldtune.training.answers import AnswerForward, answer_metrics
from shieldtune.training.loop import planned_steps

__all__ = [
    "Prepared",
    "prepare",
    "load_splits",
    "open_run",
    "seed_everything",
    "batch_forward_args",
    "answer_evaluation",
    "passive_threads",
]


@dataclass
class Prepared:
    """What a recipe starts from."""

    loaded: LoadedModel
    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    dataset: Dataset
    num_labels: int
    test_dataset: Dataset | None = None  # the test rows as examples (answer evaluation)
    total_steps: int = 0  # optimisation steps the run will take (epochs × batches, or max_steps)


def seed_everything(seed: int) -> None:
    """Seed Python and torch (initialisation, dropout)."""
    random.seed(seed)
    torch.manual_seed(seed)


def load_dataset(cfg: RunConfig) -> Dataset:
    """The configured dataset (built-in name or a table with column mapping)."""
    d = cfg.data
    if d.dataset == "table":
        missing = [f"data.{k}" for k in ("path", "text", "label") if getattr(d, k) is None]
        if missing:
            raise ConfigError(f"dataset 'table' needs {', '.join(missing)}")
        return load_table(Path(d.path), text=d.text, label=d.label, text_pair=d.text_pair)
    if d.dataset not in BUILTIN_DATASETS:
        raise ConfigError(
            f"data.dataset: unknown dataset {d.dataset!r}; accepted: "
            f"{', '.join(sorted(BUILTIN_DATASETS))}, table"
        )
    return load_builtin(d.dataset, d.data_dir)


def load_splits(cfg: RunConfig) -> tuple[Dataset, Dataset, Dataset]:
    """The dataset and its train / test splits (split seed, row caps), not tokenised.

    Returns:
        ``(dataset, train split, test split)``.
    """
    ds = load_dataset(cfg)
    train_ds, test_ds = train_test_split(
        ds, test_fraction=cfg.data.test_fraction, seed=cfg.data.split_seed
    )
    if cfg.data.max_train_examples:
        train_ds = subset(train_ds, range(min(cfg.data.max_train_examples, len(train_ds))))
    if cfg.data.max_test_examples:
        test_ds = subset(test_ds, range(min(cfg.data.max_test_examples, len(test_ds))))
    return ds, train_ds, test_ds


def prepare(cfg: RunConfig) -> Prepared:
    """Load data and model, split with the split seed, tokenise both splits."""
    seed_everything(cfg.train.seed)
    ds, train_ds, test_ds = load_splits(cfg)
    task = cfg.model.task
    loaded = load_model(
        cfg.model.name, task, ds.num_labels if task == "seq-cls" else None, seed=cfg.train.seed
    )
    if task == "seq-cls":
        enc = lambda part: encode_classification(part, loaded.tokenizer, cfg.data.max_length)  # noqa: E731
    else:
        enc = lambda part: encode_instruction(part, loaded.tokenizer, cfg.data.max_length)  # noqa: E731
    t = cfg.train
    steps = planned_steps(len(train_ds), t.epochs, t.batch_size, t.max_steps)
    return Prepared(loaded, enc(train_ds), enc(test_ds), ds, ds.num_labels, test_ds, steps)


def answer_evaluation(cfg: RunConfig, prep: Prepared, forward: AnswerForward) -> dict[str, float]:
    """Answer metrics of a causal LM on a classification test split (``{}`` otherwise).

    ``accuracy`` / ``macro_f1`` / ``mean_token_accuracy`` by scoring each allowed answer, plus
    ``gen_accuracy`` / ``gen_invalid_rate`` when ``train.eval_generation`` is set.

    Args:
        cfg: The run config.
        prep: What :func:`prepare` returned.
        forward: ``forward(input_ids, attention_mask) -> (B, T, V)`` logits, in eval mode.
    """
    test = prep.test_dataset
    if cfg.model.task != "causal-lm" or test is None or len(test.label_names) < 2:
        return {}
    return answer_metrics(
        forward,
        prep.loaded.tokenizer,
        test,
        max_length=cfg.data.max_length,
        batch_size=cfg.train.eval_batch_size,
        generation=cfg.train.eval_generation,
    )


def open_run(cfg: RunConfig) -> RunDir:
    """Create the (partial) run folder and write the resolved config into it."""
    name = (
        cfg.run_name or f"{cfg.mode}-{Path(cfg.model.name).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    run = RunDir(Path(cfg.output_dir), name)
    run.write_text("config.yaml", to_yaml(cfg))
    return run


def batch_forward_args(batch: dict[str, torch.Tensor]) -> tuple[Any, ...]:
    """(input_ids, attention_mask, token_type_ids) of a batch."""
    return batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")


@contextmanager
def passive_threads(on: bool = True) -> Iterator[None]:
    """Launch enclaves (or workers) with sleeping, not spinning, idle OpenMP threads.

    Processes that take turns on the same cores (a client and its server enclave) otherwise
    burn each other's time spinning between calls: a tiny federated split run took 20× longer.
    """
    saved = os.environ.get("OMP_WAIT_POLICY")
    if on and saved is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read once, at the enclave's launch
    try:
        yield
    finally:
        if on and saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
