"""Enclave program ``split-server``: the back slice, its adapter, optimiser and loss, in the TEE.

The program's config is part of the enclave measurement, so a client that verifies the quote
knows which model, cut, adapter and optimiser settings it trains with::

    model, task, num_labels, cut, adapter (JSON of {method, ...}), lr, weight_decay, grad_clip,
    schedule, warmup_ratio, seed, total_steps, precision, wire_dtype, allow_export, max_tokens

Every ECALL is meant to be reached through the attested channel (see
:mod:`shieldtune.split.protocol` for the requests). ``init`` builds the state in the same order
as the plain-split recipe (seed, model, slice, back adapter, optimiser, RNG stream), so both
modes start from identical weights and draw identical dropout. A training step is staged and
applied only when the client commits it; a malformed request is refused before anything changes.

    enclave:  h ~ client, y ~ client
              loss = L(back(h), y);  g = ∂loss/∂h;  G = ∂loss/∂θ_back (staged under a token)
              on commit(token): θ_back ← AdamW(θ_back, G)
"""

from __future__ import annotations

import json
import os
import random
import sys
import warnings
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import torch

from shieldtune.adapters import ADAPTERS, parse_config
from shieldtune.crypto.framing import Frame, MetaValue
from shieldtune.errors import ChannelError, ConfigError, EnclaveError
from shieldtune.models import load_model, slice_model
from shieldtune.split.protocol import (
    PROGRAM_NAME,
    BatchSpec,
    check_batch,
    check_meta,
    to_wire,
)
from shieldtune.split.step import server_step
from shieldtune.tee.program import EnclaveContext, EnclaveProgram
from shieldtune.training.losses import task_loss
from shieldtune.training.rng import SERVER_STREAM, RngStream
from shieldtune.training.steps import autocast, make_optim

__all__ = ["PROGRAM", "SplitServer", "MAX_PENDING"]

PROGRAM = EnclaveProgram(PROGRAM_NAME)
#: Staged (uncommitted) steps kept at most; the oldest is dropped beyond this.
MAX_PENDING = 16
_ADAPTER = "adapter."  # sealed-state prefixes
_OPTIM = "optim."


class SplitServer:
    """The server half of split fine-tuning, as it lives inside the enclave.

    Args:
        model: Preset or local folder name.
        task: ``seq-cls`` or ``causal-lm``.
        num_labels: Classes (seq-cls).
        cut: Layers the client runs.
        adapter: ``{method, **options}`` of the back-slice adapter.
        lr: Peak learning rate.
        train: Optimiser settings (``weight_decay``, ``grad_clip``, ``schedule``,
            ``warmup_ratio``), as :func:`~shieldtune.training.steps.make_optim` reads them.
        seed: Run seed (initialisation; dropout stream ``seed + SERVER_STREAM``).
        total_steps: Steps of the run (LR schedule).
        precision: ``float32`` or ``bfloat16`` autocast.
        wire_dtype: Dtype of hidden states and gradients on the wire.
        max_tokens: Most B·T per request.
    """

    def __init__(
        self,
        *,
        model: str,
        task: str,
        num_labels: int | None,
        cut: int,
        adapter: dict[str, Any],
        lr: float,
        train: Any,
        seed: int,
        total_steps: int,
        precision: str,
        wire_dtype: str,
        max_tokens: int,
    ) -> None:
        # the plain-split order: seed, model, slice, back adapter (LoRA init draws here), optimiser
        random.seed(seed)
        torch.manual_seed(seed)
        loaded = load_model(model, task, num_labels, seed=seed)  # type: ignore[arg-type]
        _, self.back = slice_model(loaded.model, cut)
        options = dict(adapter)
        entry = ADAPTERS.get(str(options.pop("method", None)), field="adapter.method")
        self.adapter = entry.attach(
            self.back, loaded.model, parse_config(entry.config_cls, options, "adapter")
        )
        self.optim = make_optim(self.adapter.trainable_parameters(), lr, train, total_steps)
        self.rng = RngStream(seed + SERVER_STREAM)
        self.task, self.precision, self.wire_dtype = task, precision, wire_dtype
        cfg = self.back.config
        self.spec = BatchSpec(
            task, cfg.hidden_size, num_labels, cfg.vocab_size, wire_dtype, max_tokens
        )
        self.pending: OrderedDict[str, list[torch.Tensor | None]] = OrderedDict()
        self.steps = 0

    # ------------------------------------------------------------------ training
    def train_step(
        self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[float, torch.Tensor, str]:
        """Loss and ∂loss/∂hidden; the back-slice update is staged under the returned token."""
        self.back.train()
        for p in self.optim.params:
            p.grad = None
        try:
            with self.rng.active():
                loss, grad = server_step(
                    self.back, hidden, mask, labels, self.task, self.precision
                )  # (), (B, T, d)
            staged = [p.grad for p in self.optim.params]  # ∂loss/∂θ, applied on commit
        finally:
            for p in self.optim.params:
                p.grad = None
        token = os.urandom(16).hex()
        self.pending[token] = staged
        while len(self.pending) > MAX_PENDING:
            self.pending.popitem(last=False)  # a client that went away never commits
        return float(loss), grad, token

    def check_commit(self, token: str | None) -> None:
        """Refuse an unknown token (before anything else of the request runs).

        Raises:
            ChannelError: The token was never issued, was committed already or was dropped.
        """
        if token is not None and token not in self.pending:
            raise ChannelError(
                "commit refused: unknown step token (already committed, dropped after "
                f"{MAX_PENDING} newer steps, or never issued); nothing was applied"
            )

    def commit(self, token: str | None) -> None:
        """Apply a staged step: the optimiser step plain-split takes right after the backward."""
        if token is None:
            return
        staged = self.pending.pop(token)
        for p, g in zip(self.optim.params, staged, strict=True):
            p.grad = g
        self.optim.step()  # clip, AdamW, schedule, zero_grad
        self.steps += 1

    def grad_only(
        self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[float, torch.Tensor]:
        """Loss and ∂loss/∂hidden in eval mode (SPF gradient saliency): no update, no RNG."""
        self.back.eval()
        received = hidden.detach().float().requires_grad_(True)  # (B, T, d)
        logits = self.back(received, mask)  # (B, C) or (B, T, V)
        loss = task_loss(logits, labels, self.task)  # ()
        (grad,) = torch.autograd.grad(loss, received)  # (B, T, d); θ_back grads untouched
        return float(loss.detach()), grad

    @torch.no_grad()
    def eval_logits(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits of the back slice in eval mode."""
        self.back.eval()
        with autocast(self.precision):
            return self.back(hidden.float(), mask)  # (B, C) or (B, T, V)

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Adapter tensors, AdamW moments, step count and RNG stream (what is sealed)."""
        out = {f"{_ADAPTER}{k}": v for k, v in self.adapter.state_dict().items()}
        opt_state = self.optim.opt.state
        for i, p in enumerate(self.optim.params):
            for key, value in opt_state.get(p, {}).items():
                out[f"{_OPTIM}{i}.{key}"] = value.detach().clone().reshape(-1)
        out[f"{_OPTIM}steps"] = torch.tensor([self.steps], dtype=torch.int64)
        out[f"{_OPTIM}rng"] = self.rng.state.clone()  # the dropout stream resumes too
        return out

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`state_tensors` produced (after the host unsealed it).

        The learning-rate schedule is advanced to the restored step count.
        """
        self.adapter.load_state_dict(
            {k.removeprefix(_ADAPTER): v for k, v in state.items() if k.startswith(_ADAPTER)}
        )
        for i, p in enumerate(self.optim.params):
            moments = {
                key: state[f"{_OPTIM}{i}.{key}"]
                for key in ("step", "exp_avg", "exp_avg_sq")
                if f"{_OPTIM}{i}.{key}" in state
            }
            if moments:
                self.optim.opt.state[p] = {
                    k: v.reshape(p.shape) if k != "step" else v.reshape(())
                    for k, v in moments.items()
                }
        self.steps = int(state[f"{_OPTIM}steps"][0])
        self.rng.state = state[f"{_OPTIM}rng"].clone()
        if self.optim.sched is not None:
            with warnings.catch_warnings():  # "scheduler stepped before the optimiser": intended
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(self.steps):
                    self.optim.sched.step()


# ---------------------------------------------------------------------- ECALLs
_SERVER: dict[str, SplitServer] = {}  # one enclave process serves one program instance


def _server() -> SplitServer:
    server = _SERVER.get("server")
    if server is None:
        raise EnclaveError("split-server is not initialised: call 'init' first")
    return server


def _build(config: dict[str, MetaValue]) -> SplitServer:
    try:
        adapter = json.loads(str(config["adapter"]))
        train = SimpleNamespace(
            weight_decay=float(config["weight_decay"]),  # type: ignore[arg-type]
            grad_clip=None if config["grad_clip"] is None else float(config["grad_clip"]),  # type: ignore[arg-type]
            schedule=str(config["schedule"]),
            warmup_ratio=float(config["warmup_ratio"]),  # type: ignore[arg-type]
        )
        num_labels = config["num_labels"]
        return SplitServer(
            model=str(config["model"]),
            task=str(config["task"]),
            num_labels=None if num_labels is None else int(num_labels),  # type: ignore[arg-type]
            cut=int(config["cut"]),  # type: ignore[arg-type]
            adapter=adapter,
            lr=float(config["lr"]),  # type: ignore[arg-type]
            train=train,
            seed=int(config["seed"]),  # type: ignore[arg-type]
            total_steps=int(config["total_steps"]),  # type: ignore[arg-type]
            precision=str(config["precision"]),
            wire_dtype=str(config["wire_dtype"]),
            max_tokens=int(config["max_tokens"]),  # type: ignore[arg-type]
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"split-server config is incomplete or invalid: {err!r}") from None


def _loaded_modules() -> list[MetaValue]:
    """Project modules this enclave process has loaded (all must be measured)."""
    return [m for m in sorted(sys.modules) if m == "shieldtune" or m.startswith("shieldtune.")]


@PROGRAM.ecall("init")
def init(ctx: EnclaveContext, request: Frame) -> Frame:
    """Build the back slice, adapter, optimiser and RNG stream (once; later calls only report).

    The reply lists the project modules loaded in the enclave (a test checks all are measured).

    If the host unsealed a checkpoint before, the adapter and optimiser resume from it.
    """
    check_meta("init", request.meta)
    restored = False
    if "server" not in _SERVER:
        server = _build(ctx.config)
        if any(k.startswith(_ADAPTER) for k in ctx.state):
            server.restore(dict(ctx.state))
            restored = True
        _SERVER["server"] = server
    server = _server()
    if ctx.simulated:
        ctx.log.warning("split-server runs in a SIMULATED enclave (no hardware protection)")
    return Frame(
        meta={
            "trainable_params": server.optim.num_params(),
            "steps": server.steps,
            "restored": restored,
            "hidden_size": server.spec.hidden_size,
            "wire_dtype": server.wire_dtype,
            "simulated": ctx.simulated,
            "measurement": ctx.measurement,
            "modules": _loaded_modules(),
        }
    )


@PROGRAM.ecall("train_step")
def train_step(ctx: EnclaveContext, request: Frame) -> Frame:
    """One staged training step: loss and the gradient of the received hidden states."""
    server = _server()
    token = check_meta("train_step", request.meta)
    hidden, mask, labels = check_batch(request, server.spec, "train_step", labels=True)
    server.check_commit(token)  # everything checked: from here on state may change
    server.commit(token)
    assert labels is not None
    loss, grad, staged = server.train_step(hidden, mask, labels)
    return Frame(
        meta={"loss": loss, "token": staged}, tensors={"grad": to_wire(grad, server.wire_dtype)}
    )


@PROGRAM.ecall("commit")
def commit(ctx: EnclaveContext, request: Frame) -> Frame:
    """Apply the staged step named by ``commit``."""
    server = _server()
    token = check_meta("commit", request.meta)
    if request.tensors:
        raise ChannelError("malformed 'commit' request refused: it takes no tensors")
    server.check_commit(token)
    server.commit(token)
    return Frame(meta={"steps": server.steps})


@PROGRAM.ecall("grad_only")
def grad_only(ctx: EnclaveContext, request: Frame) -> Frame:
    """Loss and ∂loss/∂hidden in eval mode, nothing updated (SPF gradient warm-up)."""
    server = _server()
    token = check_meta("grad_only", request.meta)
    hidden, mask, labels = check_batch(request, server.spec, "grad_only", labels=True)
    server.check_commit(token)
    server.commit(token)
    assert labels is not None
    loss, grad = server.grad_only(hidden, mask, labels)
    return Frame(meta={"loss": loss}, tensors={"grad": to_wire(grad, server.wire_dtype)})


@PROGRAM.ecall("eval_step")
def eval_step(ctx: EnclaveContext, request: Frame) -> Frame:
    """Logits of the back slice for received hidden states (eval mode)."""
    server = _server()
    token = check_meta("eval_step", request.meta)
    hidden, mask, _ = check_batch(request, server.spec, "eval_step", labels=False)
    server.check_commit(token)
    server.commit(token)
    return Frame(tensors={"logits": server.eval_logits(hidden, mask)})


@PROGRAM.ecall("export_adapter")
def export_adapter(ctx: EnclaveContext, request: Frame) -> Frame:
    """The adapter's tensors, to the client at the other end of the channel (if allowed)."""
    server = _server()
    token = check_meta("export_adapter", request.meta)
    if not ctx.config.get("allow_export"):
        raise EnclaveError(
            "export_adapter refused: this enclave's measured config has allow_export false"
        )
    server.check_commit(token)
    server.commit(token)
    return Frame(meta={"steps": server.steps}, tensors=server.adapter.state_dict())


@PROGRAM.ecall("checkpoint")
def checkpoint(ctx: EnclaveContext, request: Frame) -> Frame:
    """Copy the adapter and optimiser state into enclave state, for the host to seal."""
    server = _server()
    token = check_meta("checkpoint", request.meta)
    server.check_commit(token)
    server.commit(token)
    for key in [k for k in ctx.state if k.startswith((_ADAPTER, _OPTIM))]:
        del ctx.state[key]
    for key, value in server.state_tensors().items():
        ctx.state[key] = value
    return Frame(meta={"steps": server.steps, "tensors": len(ctx.state)})
