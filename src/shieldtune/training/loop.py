"""The epoch loop every recipe shares: batches, step, periodic metrics, evaluation per epoch.

A recipe supplies ``step(batch) -> loss`` (its own explicit forward/backward/update) and
``evaluate() -> metrics``; this loop only schedules them, logs and reports progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from shieldtune.data.tasks import batches
from shieldtune.training.rundir import RunDir

__all__ = ["fit", "FitResult", "planned_steps"]


def planned_steps(n_rows: int, epochs: int, batch_size: int, max_steps: int | None) -> int:
    """Optimisation steps a run takes: ``epochs × ceil(n / batch)``, capped by ``max_steps``."""
    total = epochs * -(-n_rows // batch_size)
    return min(total, max_steps) if max_steps else total


class FitResult(dict):
    """Final metrics plus ``steps``, ``train_time_s`` and ``history`` (one dict per epoch)."""


def fit(
    step: Callable[[dict[str, torch.Tensor]], float],
    evaluate: Callable[[], dict[str, float]],
    train: dict[str, torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    max_steps: int | None,
    log_every: int,
    run: RunDir | None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train for ``epochs`` (or ``max_steps``), evaluating after each epoch.

    Args:
        step: Does one optimisation step on a batch and returns its loss.
        evaluate: Returns test metrics for the current weights.
        train: Encoded training split.
        epochs: Passes over the data.
        batch_size: Rows per step.
        seed: Shuffle seed (epoch-mixed).
        max_steps: Optional cap on the total number of steps.
        log_every: Steps between ``train`` metric lines.
        run: Where metric lines go (None: nowhere).
        on_progress: Called after each step with ``{step, total, loss, samples_per_s}``.

    Returns:
        Final test metrics, with step count, training time and per-epoch history.
    """
    total = planned_steps(int(train["labels"].shape[0]), epochs, batch_size, max_steps)
    steps, seen, train_time = 0, 0, 0.0
    history: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    for epoch in range(epochs):
        running, count = 0.0, 0
        for batch in batches(train, batch_size, shuffle=True, seed=seed, epoch=epoch):
            t0 = time.perf_counter()
            loss = step(batch)
            train_time += time.perf_counter() - t0
            steps += 1
            seen += int(batch["labels"].shape[0])
            running, count = running + loss, count + 1
            info = {
                "step": steps,
                "total": total,
                "loss": loss,
                "samples_per_s": seen / max(train_time, 1e-9),
            }
            if on_progress:
                on_progress(info)
            if run and steps % log_every == 0:
                run.log(
                    kind="train",
                    epoch=epoch + 1,
                    step=steps,
                    loss=running / count,
                    samples_per_s=round(info["samples_per_s"], 2),
                )
                running, count = 0.0, 0
            if max_steps and steps >= max_steps:
                break
        metrics = evaluate()
        record = {"epoch": epoch + 1, "step": steps, **metrics}
        history.append(record)
        if run:
            run.log(kind="eval", **record)
        if max_steps and steps >= max_steps:
            break
    return FitResult(
        **metrics,
        steps=steps,
        train_time_s=round(train_time, 3),
        samples_per_s=round(seen / max(train_time, 1e-9), 2),
        history=history,
    )
