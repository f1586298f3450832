"""Enclave program ``fedavg``: the server TEE's side of secure FedAvg.

Clients reach it only over the attested channel (their updates and the global adapter are
ciphertext to the host); the host may only ask it to aggregate and for its status, and learns
counts and refusal reasons, never a tensor.

State (``ctx.state``, sealed by ``Enclave.seal``, so a restarted server resumes at the same round):

- ``round``: int64 scalar, the number of completed aggregations;
- ``g:<name>``: the global adapter (absent before the first aggregation: clients then start
  from the shared seeded initialisation);
- ``u:<client>:<name>`` and ``n:<client>``: updates submitted for the next round, and their
  sample counts.

ECALLs over the channel only: ``submit`` (an update for round ``round + 1``), ``fetch`` (the
global adapter). ECALLs from the host only (in the clear, no tensors): ``aggregate``, ``status``.

Program config (part of the measurement, so clients verify it): ``max_update_bytes``,
``min_updates``.

The same ECALLs also serve as the ``fedavg-sparse`` program
(:mod:`~shieldtune.federated.sparse_program`, for split clients' SPF deltas), whose
measurement includes the SPF delta code and whose config adds the DP settings ``dp_clip``
(C, or None) and ``dp_sigma`` (σ): updates are then sparse deltas
(:func:`~shieldtune.federated.aggregate.sparse_state`, masks may differ, empty allowed),
averaged on the union support by :func:`~shieldtune.federated.aggregate.sparse_fedavg` (clip
each client's update to C, Gaussian noise from the OS CSPRNG, drawn in the enclave).
"""

from __future__ import annotations

import torch

from shieldtune.crypto.framing import Frame, MetaValue
from shieldtune.errors import EnclaveError, IntegrityError, ShieldtuneError
from shieldtune.federated.aggregate import (
    fedavg,
    screen_updates,
    sparse_fedavg,
    sparse_from_state,
    spec_of,
    validate_update,
)
from shieldtune.federated.dp import check_dp
from shieldtune.tee.program import EnclaveContext, EnclaveProgram, loaded_modules

__all__ = ["PROGRAM", "NAME", "SPARSE_NAME"]

NAME = "fedavg"
SPARSE_NAME = "fedavg-sparse"
PROGRAM = EnclaveProgram(NAME)
_MAX_REASONS = 16
_refused: list[str] = []  # refusal reasons of the round in progress (not secret, not sealed)


def _config_int(ctx: EnclaveContext, key: str) -> int:
    value = ctx.config.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise EnclaveError(f"program config {key!r} must be an integer, got {value!r}")
    return value


def _sparse(ctx: EnclaveContext) -> bool:
    """Whether this is the ``fedavg-sparse`` program (the dense one refuses DP settings)."""
    if ctx.program == SPARSE_NAME:
        return True
    if ctx.config.get("dp_clip") is not None or ctx.config.get("dp_sigma"):
        raise EnclaveError(f"program config: DP settings need the {SPARSE_NAME!r} program")
    return False


def _dp(ctx: EnclaveContext) -> tuple[float | None, float]:
    """``(dp_clip, dp_sigma)`` of the measured config (checked: a bad value is refused)."""
    clip, sigma = ctx.config.get("dp_clip"), ctx.config.get("dp_sigma", 0.0)
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))):
        raise EnclaveError(f"program config 'dp_clip' must be a number or None, got {clip!r}")
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool):
        raise EnclaveError(f"program config 'dp_sigma' must be a number, got {sigma!r}")
    out = (None if clip is None else float(clip), float(sigma))
    check_dp(*out, names=("program config dp_clip", "program config dp_sigma"))
    return out


def _round(ctx: EnclaveContext) -> int:
    return int(ctx.state["round"]) if "round" in ctx.state else 0


def _global(ctx: EnclaveContext) -> dict[str, torch.Tensor]:
    return {k[2:]: v for k, v in ctx.state.items() if k.startswith("g:")}


def _pending(ctx: EnclaveContext) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in ctx.state.items():
        if key.startswith("u:"):
            _, client, name = key.split(":", 2)
            out.setdefault(client, {})[name] = value
    return out


def _clear_pending(ctx: EnclaveContext) -> None:
    for key in [k for k in ctx.state if k.startswith(("u:", "n:"))]:
        del ctx.state[key]
    _refused.clear()


def _refuse(client: str, reason: str) -> Frame:
    _refused.append(f"{client[:8]}: {reason}"[:300])
    return Frame(meta={"accepted": False, "reason": reason[:300]})


@PROGRAM.ecall("submit", host=False)
def submit(ctx: EnclaveContext, request: Frame) -> Frame:
    """Keep a client's update for the next aggregation, if it is well formed.

    Args (meta): ``client`` (id chosen by the client), ``round`` (must be ``round + 1``),
    ``num_examples`` (> 0). Tensors: the update.

    Returns:
        ``{accepted: bool, reason?: str}`` (to the client, encrypted).
    """
    client = request.meta_str("client")
    if not client.isalnum() or len(client) > 64:
        return _refuse("?", "client id must be 1..64 letters or digits")
    expected = _round(ctx) + 1
    if request.meta_int("round") != expected:
        return _refuse(client, f"update for round {request.meta.get('round')}, expected {expected}")
    if f"n:{client}" in ctx.state:
        return _refuse(client, f"a second update in round {expected}")
    weight = request.meta_float("num_examples")
    glob = _global(ctx)
    try:
        if not weight > 0 or weight != weight or weight == float("inf"):
            raise IntegrityError(f"num_examples {weight!r} must be finite and > 0")
        limit = _config_int(ctx, "max_update_bytes")
        if _sparse(ctx):
            _, bad = screen_updates([(request.tensors, weight)], None, limit, sparse=True)
            if bad:
                raise IntegrityError(bad[0])
        else:
            validate_update(request.tensors, spec_of(glob) if glob else None, limit)
    except IntegrityError as err:
        ctx.log.warning("refused an update: %s", err)
        return _refuse(client, str(err))
    for name, tensor in request.tensors.items():
        ctx.state[f"u:{client}:{name}"] = tensor.clone()
    ctx.state[f"n:{client}"] = torch.tensor(weight, dtype=torch.float64)
    return Frame(meta={"accepted": True, "round": expected})


@PROGRAM.ecall("fetch", host=False)
def fetch(ctx: EnclaveContext, request: Frame) -> Frame:
    """The global adapter and its round (no tensors before the first aggregation)."""
    return Frame(meta={"round": _round(ctx)}, tensors=_global(ctx))


@PROGRAM.ecall("aggregate", channel=False)
def aggregate(ctx: EnclaveContext, request: Frame) -> Frame:
    """FedAvg of the submitted updates into the global adapter (host call, no tensors).

    Each update is screened on its own (structure of the global adapter, or of the majority
    before the first round; finite; size; sparse deltas: well-formed triples); refused ones
    are dropped, not averaged. Sparse deltas are averaged on the union support, with DP when
    the measured config sets ``dp_clip``.

    Returns:
        ``{round, accepted, refused, reasons}``.

    Raises:
        EnclaveError: Fewer than ``min_updates`` acceptable updates (the global adapter and the
            round stay as they were; the submitted updates are discarded).
    """
    expected = _round(ctx) + 1
    if request.meta_int("round") != expected:
        raise EnclaveError(f"aggregate for round {request.meta.get('round')}, expected {expected}")
    pending = _pending(ctx)
    clients = sorted(pending)
    updates = [(pending[c], float(ctx.state[f"n:{c}"])) for c in clients]
    glob = _global(ctx)
    sparse, limit = _sparse(ctx), _config_int(ctx, "max_update_bytes")
    spec = spec_of(glob) if glob and not sparse else None
    accepted, refused = screen_updates(updates, spec, limit, sparse=sparse)
    reasons = [*_refused, *(f"{clients[i][:8]}: {r}" for i, r in refused.items())]
    n_refused = len(_refused) + len(refused)
    minimum = _config_int(ctx, "min_updates")
    if len(accepted) < minimum:
        _clear_pending(ctx)
        raise EnclaveError(
            f"round {expected}: {len(accepted)} acceptable update(s), fewer than min_clients "
            f"({minimum}); refused: {'; '.join(reasons[:3]) or 'none'}"
        )
    chosen = [updates[i] for i in accepted]
    try:
        if sparse:
            clip, sigma = _dp(ctx)
            new = sparse_fedavg(chosen, glob, clip=clip, sigma=sigma, max_bytes=limit)
        else:
            new = fedavg(chosen)
    except ShieldtuneError as err:  # e.g. deltas of one parameter with different shapes
        _clear_pending(ctx)
        raise EnclaveError(f"round {expected}: aggregation refused: {err}") from None
    for key in [k for k in ctx.state if k.startswith("g:")]:
        del ctx.state[key]
    _clear_pending(ctx)
    for name, tensor in new.items():
        ctx.state[f"g:{name}"] = tensor
    ctx.state["round"] = torch.tensor(expected, dtype=torch.int64)
    listed: list[MetaValue] = list(reasons[:_MAX_REASONS])
    return Frame(
        meta={
            "round": expected,
            "accepted": len(accepted),
            "refused": n_refused,
            "reasons": listed,  # type: ignore[dict-item]
            "weight": sum(updates[i][1] for i in accepted),
        }
    )


@PROGRAM.ecall("status", channel=False)
def status(ctx: EnclaveContext, request: Frame) -> Frame:
    """Round, pending updates, whether a global adapter exists, loaded modules (host call).

    A sparse program loads its SPF delta code here first, so that the module list is what it
    runs and the first aggregation does not pay the import.
    """
    if _sparse(ctx):
        _dp(ctx)  # a bad DP setting is refused before any round
        sparse_from_state({})
    return Frame(
        meta={
            "round": _round(ctx),
            "pending": len(_pending(ctx)),
            "has_global": bool(_global(ctx)),
            "simulated": ctx.simulated,
            "modules": loaded_modules(),
        }
    )
