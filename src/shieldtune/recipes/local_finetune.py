"""Recipe ``local``: the insecure single-party baseline (LoRA, P-tuning v2 or full fine-tuning).

setup -> train -> save -> cleanup, with the whole model as one slice, so the forward is the
same code the split modes run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from shieldtune.adapters import ADAPTERS
from shieldtune.config import RunConfig, adapter_settings
from shieldtune.models import full_slice
from shieldtune.recipes._common import batch_forward_args, open_run, prepare
from shieldtune.report import plot_metrics
from shieldtune.training import autocast, evaluate, fit, make_optim, task_loss

__all__ = ["run_local"]


def run_local(cfg: RunConfig, on_progress: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Fine-tune one adapter on the whole model and write a run folder.

    Returns:
        The completed run folder.
    """
    # setup
    prep = prepare(cfg)
    model, task = prep.loaded.model, cfg.model.task
    whole = full_slice(model)
    method, settings = adapter_settings(cfg.adapter, "adapter")
    adapter = ADAPTERS.get(method).attach(whole, model, settings)
    optim = make_optim(
        adapter.trainable_parameters(), cfg.train.lr, cfg.train.weight_decay, cfg.train.grad_clip
    )
    run = open_run(cfg)

    def step(batch: dict[str, torch.Tensor]) -> float:
        whole.train()
        with autocast(cfg.train.precision):
            logits = whole(*batch_forward_args(batch))  # (B, C) or (B, T, V)
        loss = task_loss(logits, batch["labels"], task)
        loss.backward()
        optim.step()
        return loss.item()

    def evaluate_now() -> dict[str, float]:
        whole.eval()
        with autocast(cfg.train.precision):
            return evaluate(
                lambda b: whole(*batch_forward_args(b)),
                prep.test,
                task,
                cfg.train.eval_batch_size,
                prep.num_labels,
            )

    # train
    try:
        result = fit(
            step,
            evaluate_now,
            prep.train,
            epochs=cfg.train.epochs,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            max_steps=cfg.train.max_steps,
            log_every=cfg.train.log_every,
            run=run,
            on_progress=on_progress,
        )
        # save
        adapter.save(run.path / "adapter", base_model=cfg.model.name)
        plot_metrics(
            run.path / "metrics.jsonl",
            run.path / "curves.png",
            title=f"local {method} · {cfg.model.name} · {prep.dataset.name}",
        )
    except BaseException:
        run.abort()
        raise
    # cleanup
    return run.finish(
        {
            "mode": "local",
            "method": method,
            "model": cfg.model.name,
            "dataset": prep.dataset.name,
            "train_rows": int(prep.train["labels"].shape[0]),
            "test_rows": int(prep.test["labels"].shape[0]),
            "trainable_params": optim.num_params(),
            **result,
        }
    )
