"""The ``split-server`` enclave program's state: the back slice, its adapter(s) and optimiser(s).

:class:`SplitServer` is what lives inside the enclave (the ECALLs that reach it are in
:mod:`shieldtune.split.server_program`; plain-split with several clients runs the same program
in process through :mod:`shieldtune.split.local`). It builds its state in the plain-split order
(seed, model, slice, back adapter, optimiser, RNG stream), so both modes start from identical
weights and draw identical dropout. A training step is staged and applied only when the client
that staged it commits it.

Many clients, each on its own channel session, may train at once; the enclave serves one
request at a time. ``server_adapter`` says what their steps update:

- ``shared``: one adapter, optimiser and dropout stream; every client's committed step is one
  optimiser step on it, in the order the commits arrive;
- ``per_client``: one adapter, optimiser and dropout stream per channel session (keyed by the
  session the runtime names, never by anything a client claims), all starting from the same
  adapter; :meth:`SplitServer.average` (the host's ``average`` ECALL, no tensors out) replaces
  every session's adapter by their mean weighted by the examples each committed since the last
  average.

Staged steps belong to the session that staged them; a session that closes loses its staged
steps (and, per_client, its adapter).
"""

from __future__ import annotations

import os
import random
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from shieldtune.adapters import ADAPTERS, parse_config
from shieldtune.errors import ChannelError, ConfigError
from shieldtune.models import load_model, slice_model
from shieldtune.split.protocol import BatchSpec
from shieldtune.split.step import server_step
from shieldtune.training.losses import task_loss
from shieldtune.training.rng import SERVER_STREAM, RngStream
from shieldtune.training.steps import Optim, autocast, make_optim

__all__ = ["SplitServer", "MAX_PENDING", "SERVER_ADAPTERS", "Session"]

#: Staged (uncommitted) steps kept at most per session; the oldest is dropped beyond this.
MAX_PENDING = 16
SERVER_ADAPTERS = ("shared", "per_client")
_ADAPTER = "adapter."  # sealed-state prefixes
_OPTIM = "optim."
Session = int | None  # the channel session of a request (None: the host, or in-process tests)


@dataclass
class _Slot:
    """An adapter's trainable tensors with their optimiser and dropout stream.

    ``values`` hold the tensors while another slot's are loaded in the back slice.
    """

    values: list[torch.Tensor]
    optim: Optim
    rng: RngStream
    examples: int = 0  # rows of the steps committed since the last average


@dataclass
class _Staged:
    """A computed, uncommitted step: whose it is, its rows, ∂loss/∂θ per parameter."""

    session: Session
    rows: int
    grads: list[torch.Tensor | None]


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
        server_adapter: ``shared`` or ``per_client`` (see the module docstring).
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
        server_adapter: str = "shared",
    ) -> None:
        if server_adapter not in SERVER_ADAPTERS:
            raise ConfigError(
                f"split-server server_adapter {server_adapter!r} unknown; accepted: "
                f"{', '.join(SERVER_ADAPTERS)}"
            )
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
        self.pending: OrderedDict[str, _Staged] = OrderedDict()
        self.steps = 0
        # sessions: per_client keeps one slot per session, loaded into the back slice on use
        self.per_client = server_adapter == "per_client"
        self._new_optim = lambda: make_optim(self.optim.params, lr, train, total_steps)
        self._stream_seed = seed + SERVER_STREAM
        self.main = _Slot([], self.optim, self.rng)  # shared: the one slot, always loaded
        self.slots: dict[Session, _Slot] = {}
        self.start = [p.detach().clone() for p in self.optim.params]  # per_client: round start
        self.loaded: _Slot | None = None if self.per_client else self.main

    # ------------------------------------------------------------------ sessions
    def _use(self, session: Session) -> _Slot:
        """The slot serving ``session``, its tensors loaded into the back slice."""
        if not self.per_client:
            return self.main
        slot = self.slots.get(session)
        if slot is None:  # a new session starts from the round's start adapter
            values = [t.clone() for t in self.start]
            rng = RngStream(self._stream_seed)
            slot = self.slots[session] = _Slot(values, self._new_optim(), rng)
        if slot is not self.loaded:
            self.park()
            with torch.no_grad():
                for p, v in zip(self.optim.params, slot.values, strict=True):
                    p.copy_(v)
            self.loaded = slot
        return slot

    def park(self) -> None:
        """per_client: keep the loaded session's tensors; the back slice holds the start."""
        with torch.no_grad():
            if self.loaded is not None:
                for p, v in zip(self.optim.params, self.loaded.values, strict=True):
                    v.copy_(p)
                self.loaded = None
            for p, v in zip(self.optim.params, self.start, strict=True):
                p.copy_(v)

    def close(self, session: int) -> None:
        """Forget a closed session: its staged steps and (per_client) its adapter."""
        for token in [t for t, st in self.pending.items() if st.session == session]:
            del self.pending[token]
        slot = self.slots.pop(session, None)
        if slot is not None and slot is self.loaded:
            self.loaded = None  # its tensors go with it; the next session loads its own

    def average(self) -> dict[str, int]:
        """per_client: every session's adapter := their mean, weighted by committed examples.

        The mean (float64, cast back) is also the start of sessions that join later. Sessions
        with no committed step since the last average have no weight. A no-op for ``shared``.

        Returns:
            ``{sessions, averaged, examples}``.
        """
        if not self.per_client:
            return {"sessions": 0, "averaged": 0, "examples": 0}
        self.park()
        weighted = [s for s in self.slots.values() if s.examples > 0]
        total = sum(s.examples for s in weighted)
        if weighted:
            for i, start in enumerate(self.start):
                acc = torch.zeros(start.shape, dtype=torch.float64)  # (parameter shape)
                for slot in weighted:
                    acc += slot.values[i].double() * (slot.examples / total)
                start.copy_(acc.to(start.dtype))
            with torch.no_grad():
                for p, v in zip(self.optim.params, self.start, strict=True):
                    p.copy_(v)
        for slot in self.slots.values():
            for v, start in zip(slot.values, self.start, strict=True):
                v.copy_(start)
            slot.examples = 0
        return {"sessions": len(self.slots), "averaged": len(weighted), "examples": total}

    # ------------------------------------------------------------------ training
    def train_step(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        labels: torch.Tensor,
        session: Session = None,
    ) -> tuple[float, torch.Tensor, str]:
        """Loss and ∂loss/∂hidden; the back-slice update is staged under the returned token."""
        slot = self._use(session)
        self.back.train()
        for p in self.optim.params:
            p.grad = None
        try:
            with slot.rng.active():
                loss, grad = server_step(
                    self.back, hidden, mask, labels, self.task, self.precision
                )  # (), (B, T, d)
            staged = [p.grad for p in self.optim.params]  # ∂loss/∂θ, applied on commit
        finally:
            for p in self.optim.params:
                p.grad = None
        token = os.urandom(16).hex()
        self.pending[token] = _Staged(session, int(hidden.shape[0]), staged)
        mine = [t for t, st in self.pending.items() if st.session == session]
        for old in mine[:-MAX_PENDING]:
            del self.pending[old]  # a client that went away never commits
        return float(loss), grad, token

    def check_commit(self, token: str | None, session: Session = None) -> None:
        """Refuse an unknown token (before anything else of the request runs).

        Raises:
            ChannelError: The token was never issued to this session, was committed already or
                was dropped.
        """
        staged = self.pending.get(token) if token is not None else None
        if token is not None and (staged is None or staged.session != session):
            raise ChannelError(
                "commit refused: unknown step token (already committed, dropped after "
                f"{MAX_PENDING} newer steps, or never issued); nothing was applied"
            )

    def commit(self, token: str | None, session: Session = None) -> None:
        """Apply a staged step: the optimiser step plain-split takes right after the backward."""
        if token is None:
            return
        staged = self.pending.pop(token)
        slot = self._use(session)
        for p, g in zip(self.optim.params, staged.grads, strict=True):
            p.grad = g
        slot.optim.step()  # clip, AdamW, schedule, zero_grad
        slot.examples += staged.rows
        self.steps += 1

    def grad_only(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        labels: torch.Tensor,
        session: Session = None,
    ) -> tuple[float, torch.Tensor]:
        """Loss and ∂loss/∂hidden in eval mode (SPF gradient saliency): no update, no RNG."""
        self._use(session)
        self.back.eval()
        received = hidden.detach().float().requires_grad_(True)  # (B, T, d)
        logits = self.back(received, mask)  # (B, C) or (B, T, V)
        loss = task_loss(logits, labels, self.task)  # ()
        (grad,) = torch.autograd.grad(loss, received)  # (B, T, d); θ_back grads untouched
        return float(loss.detach()), grad

    @torch.no_grad()
    def eval_logits(
        self, hidden: torch.Tensor, mask: torch.Tensor, session: Session = None
    ) -> torch.Tensor:
        """Logits of the back slice in eval mode (per_client: the session's adapter)."""
        self._use(session)
        self.back.eval()
        with autocast(self.precision):
            return self.back(hidden.float(), mask)  # (B, C) or (B, T, V)

    # ------------------------------------------------------------------ state
    def adapter_state(self, session: Session = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors (per_client: the session's)."""
        self._use(session)
        return self.adapter.state_dict()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Adapter tensors, AdamW moments, step count and RNG stream (what is sealed).

        per_client: the start adapter (the last average) without moments, which are per session.
        """
        if self.per_client:
            self.park()
        out = {f"{_ADAPTER}{k}": v for k, v in self.adapter.state_dict().items()}
        opt_state = {} if self.per_client else self.optim.opt.state
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
        self.start = [p.detach().clone() for p in self.optim.params]
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
