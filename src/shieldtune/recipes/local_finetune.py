"""Recipe ``local``: the insecure single-party baseline (LoRA, P-tuning v2 or full fine-tuning).

setup -> train -> save -> cleanup, with the whole model as one slice, so the forward is the
same code the split modes run. With ``train.zero_shot`` the base model (before any adapter is
attached) is evaluated first: an epoch-0 entry in the history and ``zero_shot_*`` in the summary.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from shieldtune.adapters import ADAPTERS
from shieldtune.config import RunConfig, adapter_settings
from shieldtune.models import full_slice
from shieldtune.recipes._common import answer_evaluation, batch_forward_args, open_run, prepare
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

    def evaluate_now() -> dict[str, float]:
        whole.eval()
        with autocast(cfg.train.precision):
            metrics = evaluate(
                lambda b: whole(*batch_forward_args(b)),
                prep.test,
                task,
                cfg.train.eval_batch_size,
                prep.num_labels,
            )
            return {**metrics, **answer_evaluation(cfg, prep, whole)}

    # the base model, before an adapter changes anything (evaluation draws no random numbers)
    zero_shot = evaluate_now() if cfg.train.zero_shot else None
    method, settings = adapter_settings(cfg.adapter, "adapter")
    adapter = ADAPTERS.get(method).attach(whole, model, settings)
    optim = make_optim(adapter.trainable_parameters(), cfg.train.lr, cfg.train, prep.total_steps)
    run = open_run(cfg)

    def step(batch: dict[str, torch.Tensor]) -> float:
        whole.train()
        with autocast(cfg.train.precision):
            logits = whole(*batch_forward_args(batch))  # (B, C) or (B, T, V)
        loss = task_loss(logits, batch["labels"], task)
        loss.backward()
        optim.step()
        return loss.item()

    # train
    try:
        if zero_shot is not None:
            run.log(kind="eval", epoch=0, step=0, **zero_shot)
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
        if zero_shot is not None:
            result["history"].insert(0, {"epoch": 0, "step": 0, **zero_shot})
            result.update({f"zero_shot_{k}": v for k, v in zero_shot.items()})
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
