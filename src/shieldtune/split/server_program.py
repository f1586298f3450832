"""Enclave program ``split-server``: the back slice, its adapter, optimiser and loss, in the TEE.

The program's config is part of the enclave measurement, so a client that verifies the quote
knows which model, cut, adapter and optimiser settings it trains with::

    model, task, num_labels, cut, adapter (JSON of {method, ...}), lr, weight_decay, grad_clip,
    schedule, warmup_ratio, seed, total_steps, precision, wire_dtype, allow_export, max_tokens,
    server_adapter

Many clients may train at once, each on its own channel session (``ctx.session``); the state
and what ``server_adapter`` (``shared`` / ``per_client``) means are in
:mod:`shieldtune.split.server`. The host may call only ``init``, ``checkpoint`` and
``average`` (no tensors out); the training and export ECALLs are reachable only through a
client's attested channel.

See :mod:`shieldtune.split.protocol` for the requests. ``init`` builds the state in the same
order as the plain-split recipe (seed, model, slice, back adapter, optimiser, RNG stream), so
both modes start from identical weights and draw identical dropout. A training step is staged
and applied only when the client commits it; a malformed request is refused before anything
changes.

    enclave:  h ~ client, y ~ client
              loss = L(back(h), y);  g = ∂loss/∂h;  G = ∂loss/∂θ_back (staged under a token)
              on commit(token): θ_back ← AdamW(θ_back, G)
"""

from __future__ import annotations

import json

from shieldtune.crypto.framing import Frame, MetaValue
from shieldtune.errors import ChannelError, ConfigError, EnclaveError
from shieldtune.split.protocol import (
    PROGRAM_NAME,
    check_batch,
    check_meta,
    to_wire,
)
from shieldtune.split.server import _ADAPTER, _OPTIM, MAX_PENDING, SplitServer
from shieldtune.tee.program import EnclaveContext, EnclaveProgram, loaded_modules
from shieldtune.training.steps import optim_from_settings

__all__ = ["PROGRAM", "SplitServer", "MAX_PENDING"]

PROGRAM = EnclaveProgram(PROGRAM_NAME)

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
        train = optim_from_settings(config)
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
            server_adapter=str(config["server_adapter"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"split-server config is incomplete or invalid: {err!r}") from None


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
            "modules": loaded_modules(),
            "server_adapter": "per_client" if server.per_client else "shared",
        }
    )


def _commit_first(ctx: EnclaveContext, server: SplitServer, token: str | None) -> None:
    """Apply the commit a request carries (after the request was checked completely)."""
    server.check_commit(token, ctx.session)
    server.commit(token, ctx.session)


@PROGRAM.ecall("train_step", host=False)
def train_step(ctx: EnclaveContext, request: Frame) -> Frame:
    """One staged training step: loss and the gradient of the received hidden states."""
    server = _server()
    token = check_meta("train_step", request.meta)
    hidden, mask, labels = check_batch(request, server.spec, "train_step", labels=True)
    _commit_first(ctx, server, token)  # everything checked: from here on state may change
    assert labels is not None
    loss, grad, staged = server.train_step(hidden, mask, labels, ctx.session)
    return Frame(
        meta={"loss": loss, "token": staged}, tensors={"grad": to_wire(grad, server.wire_dtype)}
    )


@PROGRAM.ecall("commit", host=False)
def commit(ctx: EnclaveContext, request: Frame) -> Frame:
    """Apply the staged step named by ``commit``."""
    server = _server()
    token = check_meta("commit", request.meta)
    if request.tensors:
        raise ChannelError("malformed 'commit' request refused: it takes no tensors")
    _commit_first(ctx, server, token)
    return Frame(meta={"steps": server.steps})


@PROGRAM.ecall("grad_only", host=False)
def grad_only(ctx: EnclaveContext, request: Frame) -> Frame:
    """Loss and ∂loss/∂hidden in eval mode, nothing updated (SPF gradient warm-up)."""
    server = _server()
    token = check_meta("grad_only", request.meta)
    hidden, mask, labels = check_batch(request, server.spec, "grad_only", labels=True)
    _commit_first(ctx, server, token)
    assert labels is not None
    loss, grad = server.grad_only(hidden, mask, labels, ctx.session)
    return Frame(meta={"loss": loss}, tensors={"grad": to_wire(grad, server.wire_dtype)})


@PROGRAM.ecall("eval_step", host=False)
def eval_step(ctx: EnclaveContext, request: Frame) -> Frame:
    """Logits of the back slice for received hidden states (eval mode)."""
    server = _server()
    token = check_meta("eval_step", request.meta)
    hidden, mask, _ = check_batch(request, server.spec, "eval_step", labels=False)
    _commit_first(ctx, server, token)
    return Frame(tensors={"logits": server.eval_logits(hidden, mask, ctx.session)})


@PROGRAM.ecall("export_adapter", host=False)
def export_adapter(ctx: EnclaveContext, request: Frame) -> Frame:
    """The adapter's tensors, to the client at the other end of the channel (if allowed)."""
    server = _server()
    token = check_meta("export_adapter", request.meta)
    if not ctx.config.get("allow_export"):
        raise EnclaveError(
            "export_adapter refused: this enclave's measured config has allow_export false"
        )
    _commit_first(ctx, server, token)
    return Frame(meta={"steps": server.steps}, tensors=server.adapter_state(ctx.session))


@PROGRAM.ecall("average", channel=False)
def average(ctx: EnclaveContext, request: Frame) -> Frame:
    """per_client: average the sessions' adapters (host call after a round; no tensors out)."""
    check_meta("average", request.meta)
    if request.tensors:
        raise ChannelError("malformed 'average' request refused: it takes no tensors")
    return Frame(meta={**_server().average(), "steps": _server().steps})


@PROGRAM.on_close
def session_closed(ctx: EnclaveContext, session: int) -> None:
    """A channel session closed: its staged steps (and per_client adapter) are dropped."""
    server = _SERVER.get("server")
    if server is not None:
        server.close(session)


@PROGRAM.ecall("checkpoint")
def checkpoint(ctx: EnclaveContext, request: Frame) -> Frame:
    """Copy the adapter and optimiser state into enclave state, for the host to seal."""
    server = _server()
    token = check_meta("checkpoint", request.meta)
    _commit_first(ctx, server, token)
    for key in [k for k in ctx.state if k.startswith((_ADAPTER, _OPTIM))]:
        del ctx.state[key]
    for key, value in server.state_tensors().items():
        ctx.state[key] = value
    return Frame(meta={"steps": server.steps, "tensors": len(ctx.state)})
