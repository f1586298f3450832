"""Recipe ``plain-split``: split fine-tuning in one process, with no protection (the baseline).

The client side runs the front slice (embeddings + layers 1..k, optionally SPF); the server side
runs the back slice (layers k+1..L + head) with its adapter. The cut is explicit: the hidden
states are detached where they would be sent, and their gradient is handed back, exactly as the
secure split mode does over its channel, so the two differ only by the protection.

With ``split.clients > 1`` the run is federated over Flower
(:mod:`~shieldtune.recipes.split_federated`, shared with the secure mode).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from shieldtune.adapters import ADAPTERS
from shieldtune.config import RunConfig, adapter_settings
from shieldtune.data.tasks import batches
from shieldtune.models import ModelSlice, slice_model
from shieldtune.recipes._common import answer_evaluation, batch_forward_args, open_run, prepare
from shieldtune.report import plot_metrics
from shieldtune.split.step import client_backward, client_forward, server_step
from shieldtune.training import autocast, evaluate, fit, make_optim, task_loss
from shieldtune.training.rng import CLIENT_STREAM, SERVER_STREAM, RngStream

__all__ = ["run_plain_split", "split_step"]


def split_step(
    front: ModelSlice,
    back: ModelSlice,
    batch: dict[str, torch.Tensor],
    task: str,
    precision: str,
    train_front: bool,
    streams: tuple[RngStream, RngStream] | None = None,
) -> torch.Tensor:
    """One split forward/backward in one process; returns the loss, leaves grads on both sides.

    The same three calls the secure split mode runs across the channel (see
    :mod:`shieldtune.split.step`); each side draws dropout from its own random stream.
    """
    client_rng, server_rng = streams or (None, None)
    with client_rng.active() if client_rng else nullcontext():
        hidden = client_forward(front, batch, precision)  # (B, T, d), client side
    with server_rng.active() if server_rng else nullcontext():
        loss, grad = server_step(
            back, hidden, batch["attention_mask"], batch["labels"], task, precision
        )  # (), (B, T, d): server side
    if train_front:
        client_backward(hidden, grad)  # client side
    return loss


def run_plain_split(
    cfg: RunConfig, on_progress: Callable[[dict[str, Any]], None] | None = None
) -> Path:
    """Split fine-tuning without protection; writes a run folder.

    Returns:
        The completed run folder.
    """
    if cfg.split.clients > 1:
        from shieldtune.recipes.split_federated import run_split_federated

        return run_split_federated(cfg, on_progress)
    # setup
    prep = prepare(cfg)
    model, task, train_cfg = prep.loaded.model, cfg.model.task, cfg.train
    front, back = slice_model(model, cfg.split.cut)
    back_method, back_settings = adapter_settings(cfg.adapter, "adapter")
    back_adapter = ADAPTERS.get(back_method).attach(back, model, back_settings)
    for p in front.parameters():
        p.requires_grad_(False)
    front_adapter = None
    if cfg.split.front_adapter is not None:
        front_method, front_settings = adapter_settings(
            cfg.split.front_adapter, "split.front_adapter"
        )
        extra = {}
        if front_method == "spf":
            warm = list(
                batches(
                    prep.train, train_cfg.batch_size, shuffle=True, seed=train_cfg.seed, epoch=-1
                )
            )

            def warmup_loss(i: int) -> torch.Tensor:
                # eval mode: saliency draws no dropout, so it consumes no random numbers
                front.eval(), back.eval()
                batch = warm[i % len(warm)]
                ids, mask, types = batch_forward_args(batch)
                return task_loss(back(front(ids, mask, types), mask), batch["labels"], task)

            extra["loss_fn"] = warmup_loss
        front_adapter = ADAPTERS.get(front_method).attach(front, model, front_settings, **extra)
    server_opt = make_optim(
        back_adapter.trainable_parameters(), train_cfg.lr, train_cfg, prep.total_steps
    )
    client_opt = None
    if front_adapter is not None:
        client_opt = make_optim(
            front_adapter.trainable_parameters(),
            train_cfg.front_lr or train_cfg.lr,
            train_cfg,
            prep.total_steps,
        )
    streams = (
        RngStream(train_cfg.seed + CLIENT_STREAM),
        RngStream(train_cfg.seed + SERVER_STREAM),
    )
    run = open_run(cfg)

    def step(batch: dict[str, torch.Tensor]) -> float:
        front.train(), back.train()
        loss = split_step(
            front, back, batch, task, train_cfg.precision, client_opt is not None, streams
        )
        server_opt.step()
        if client_opt is not None:
            client_opt.step()
        return loss.item()

    def evaluate_now() -> dict[str, float]:
        front.eval(), back.eval()

        def forward(b: dict[str, torch.Tensor]) -> torch.Tensor:
            with autocast(train_cfg.precision):
                return back(front(*batch_forward_args(b)), b["attention_mask"])

        def forward_ids(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return forward({"input_ids": ids, "attention_mask": mask})

        metrics = evaluate(forward, prep.test, task, train_cfg.eval_batch_size, prep.num_labels)
        return {**metrics, **answer_evaluation(cfg, prep, forward_ids)}

    # train
    try:
        result = fit(
            step,
            evaluate_now,
            prep.train,
            epochs=train_cfg.epochs,
            batch_size=train_cfg.batch_size,
            seed=train_cfg.seed,
            max_steps=train_cfg.max_steps,
            log_every=train_cfg.log_every,
            run=run,
            on_progress=on_progress,
        )
        # save
        back_adapter.save(run.path / "back_adapter", base_model=cfg.model.name)
        if front_adapter is not None:
            front_adapter.save(run.path / "front_adapter", base_model=cfg.model.name)
        plot_metrics(
            run.path / "metrics.jsonl",
            run.path / "curves.png",
            title=f"plain-split cut={cfg.split.cut} · {cfg.model.name} · {prep.dataset.name}",
        )
    except BaseException:
        run.abort()
        raise
    # cleanup
    summary = {
        "mode": "plain-split",
        "cut": cfg.split.cut,
        "back_method": back_method,
        "front_method": front_adapter.method if front_adapter else None,
        "model": cfg.model.name,
        "dataset": prep.dataset.name,
        "server_trainable_params": server_opt.num_params(),
        "client_trainable_params": client_opt.num_params() if client_opt else 0,
        **result,
    }
    return run.finish(summary)
