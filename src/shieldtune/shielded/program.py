"""Enclave program ``shielded-party``: one party's adapter, optimiser and training step in its TEE.

The config is measured, so whoever verifies the quote knows the model, adapter, optimiser and
the offload's encoding::

    model, task, num_labels, adapter (JSON), lr, weight_decay, grad_clip, schedule,
    warmup_ratio, seed, total_steps, offload, w_bits, field_bits, max_bits, check_rate,
    fused, pool_size, rows, allow_export, server_policy

``server_policy`` (JSON of a :class:`~shieldtune.tee.attestation.Policy`, empty when the party
trains alone) is whom the party federates with (``shielded-fedavg``): its own end of the
channel to the server's ``fedavg`` enclave runs in here (:mod:`~shieldtune.tee.endpoint`,
ECALLs ``fed_hello``, ``fed_connect``, ``fed_open``, ``fed_seal``), so its update leaves and the
global adapter arrives only encrypted between the two enclaves; its host relays ciphertext.

Inside: the whole model with every frozen linear map swapped for an
:class:`~shieldtune.shielded.linear.OffloadedLinear` (``offload: true``), so embeddings, norms,
attention, activations, the adapter and the loss run here and only masked operands leave for
the untrusted accelerator (:mod:`shieldtune.shielded.worker`). With ``offload: false`` the same
program is the TEE-only baseline (the whole float32 step inside the enclave).

A step that fails (a Freivalds check, a worker that died) changes nothing: gradients are
dropped, the optimiser does not step and the dropout stream is rewound.
"""

from __future__ import annotations

import json
import os
import random
import resource
import secrets
import sys
import time
from typing import Any

import torch

from shieldtune.adapters import ADAPTERS, parse_config
from shieldtune.crypto.framing import Frame, MetaValue, bytes_to_tensor, tensor_to_bytes
from shieldtune.errors import ChannelError, ConfigError, EnclaveError, IntegrityError
from shieldtune.models import full_slice, load_model
from shieldtune.shielded.engine import (
    ClearFixedPoint,
    MaskedOffload,
    default_field_bits,
    plan_layers,
)
from shieldtune.shielded.field import Field, largest_prime_below, quantize_weight
from shieldtune.shielded.freivalds import FreivaldsCheck
from shieldtune.shielded.gemm import probe_cached, resolve_backend
from shieldtune.shielded.kernels import Kernels
from shieldtune.shielded.linear import frozen_linears, offload_linears
from shieldtune.shielded.masks import MaskPRF
from shieldtune.shielded.pool import BACKWARD, FORWARD, Factor, FactorPool
from shieldtune.shielded.worker import AcceleratorLink, weight_digest
from shieldtune.tee import endpoint
from shieldtune.tee.attestation import Policy, Verifier
from shieldtune.tee.program import EnclaveContext, EnclaveProgram
from shieldtune.training.losses import task_loss
from shieldtune.training.rng import CLIENT_STREAM, RngStream
from shieldtune.training.steps import make_optim, optim_from_settings

__all__ = ["PROGRAM", "PROGRAM_NAME", "ShieldedParty"]

PROGRAM_NAME = "shielded-party"
PROGRAM = EnclaveProgram(PROGRAM_NAME)
_ADAPTER, _OPTIM = "adapter.", "optim."


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


class ShieldedParty:
    """One party's training state as it lives inside its enclave.

    Args:
        model, task, num_labels, adapter, lr, train, seed, total_steps: As the local recipe.
        offload: Offload the frozen maps (False: TEE-only baseline, everything in here).
        w_bits: Bits of the per-channel integer weights.
        field_bits: Bits of the prime p (0: the largest for which one float64 GEMM is exact).
        max_bits: Cap on the encoded operands' bits (0: as many as the field allows).
        check_rate: Share of products Freivalds-checked.
        fused: Fuse the elementwise passes (:class:`~shieldtune.shielded.kernels.Kernels`).
        pool_size: Ready factors per stream.
        rows: Rows per factor (B·T of a training batch).
        clear_reference: Compute the fixed-point products in the clear here (tests only).
    """

    def __init__(
        self,
        *,
        model: str,
        task: str,
        num_labels: int | None,
        adapter: dict[str, Any],
        lr: float,
        train: Any,
        seed: int,
        total_steps: int,
        offload: bool,
        w_bits: int,
        field_bits: int,
        max_bits: int,
        check_rate: float,
        pool_size: int,
        rows: int,
        clear_reference: bool = False,
        fused: bool = True,
    ) -> None:
        # the local recipe's order: seed, model, adapter (its init draws here), optimiser
        random.seed(seed)
        torch.manual_seed(seed)
        self.model_name, self.task, self.num_labels, self.seed = model, task, num_labels, seed
        loaded = load_model(model, task, num_labels, seed=seed)  # type: ignore[arg-type]
        self.whole = full_slice(loaded.model)
        options = dict(adapter)
        entry = ADAPTERS.get(str(options.pop("method", None)), field="adapter.method")
        self.adapter = entry.attach(
            self.whole, loaded.model, parse_config(entry.config_cls, options, "adapter")
        )
        self.lr, self.train_cfg = lr, train
        self.optim = make_optim(self.adapter.trainable_parameters(), lr, train, total_steps)
        self.rng = RngStream(seed + CLIENT_STREAM)  # the party's own dropout stream
        self.steps = 0
        self.offload = offload
        self.engine: MaskedOffload | ClearFixedPoint | None = None
        self.info: dict[str, MetaValue] = {"offload": offload}
        if not offload:
            return
        linears = frozen_linears(self.whole, loaded.model)
        self.names = [f.name for f in linears]
        self.qws = [quantize_weight(f.weight, w_bits) for f in linears]
        bits = field_bits or default_field_bits(self.qws)
        self.field = Field(largest_prime_below(2**bits))
        self.plans = plan_layers(self.field, self.qws, max_bits or None)
        self.w_bits, self.rows, self.pool_size = w_bits, rows, pool_size
        self.check_rate = check_rate
        cache = os.environ.get("SHIELDTUNE_CACHE_DIR") or os.path.expanduser("~/.cache/shieldtune")
        cpu = torch.device("cpu")
        probe = probe_cached(self.field, self.qws, rows, cpu, cache_dir=cache)
        self.gemm = resolve_backend(None, probe)  # the enclave's own products (the factors)
        self.prepared = [self.gemm.prepare(qw, self.field, cpu) for qw in self.qws]
        self.checks = [FreivaldsCheck(qw, self.field) for qw in self.qws]
        self.kernels = Kernels(fused)
        if clear_reference:
            self.engine = ClearFixedPoint(self.field, self.plans, self.gemm, self.kernels)
        offload_linears(self.whole, self._proxy(), loaded.model)
        self.info.update(
            {
                "maps": len(self.plans),
                "p": self.field.p,
                "field_bits": self.field.bits,
                "w_bits": w_bits,
                "fwd_bits_min": min(pl.fwd_bits for pl in self.plans),
                "bwd_bits_min": min(pl.bwd_bits for pl in self.plans),
                "enclave_gemm": self.gemm.name,
                "enclave_probe": json.dumps(probe.timings_ms, sort_keys=True),
            }
        )

    def _proxy(self) -> Any:
        party = self

        class _Proxy:  # the model's maps call whichever engine is current
            def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
                return party._engine().forward(layer, x)

            def backward(self, layer: int, g: torch.Tensor) -> torch.Tensor:
                return party._engine().backward(layer, g)

        return _Proxy()

    def _engine(self) -> MaskedOffload | ClearFixedPoint:
        if self.engine is None:
            raise EnclaveError("shielded-party: no accelerator attached (call 'attach' first)")
        return self.engine

    # ------------------------------------------------------------------ accelerator
    def _make_factor(self, layer: int, direction: int, counter: Any, rows: int) -> Factor:
        out_f, in_f = self.plans[layer].shape
        sent = in_f if direction == FORWARD else out_f
        mask = self.prf.mask(counter, (rows, sent))  # (rows, sent) uniform, counter used once
        pw = self.prepared[layer]
        factor = (
            self.gemm.forward(pw, mask) if direction == FORWARD else self.gemm.backward(pw, mask)
        )
        return Factor(counter, mask, factor)

    def attach(self, socket_path: str, device: str, backend: str) -> dict[str, MetaValue]:
        """Connect the accelerator, agree on the weights, build the pool and fill it."""
        if not self.offload:
            raise EnclaveError("shielded-party runs with offload: false; nothing to attach")
        link = AcceleratorLink(socket_path)
        reply = link.setup(
            [pl.shape for pl in self.plans],
            self.rows,
            model=self.model_name,
            task=self.task,
            num_labels=self.num_labels,
            seed=self.seed,
            p=self.field.p,
            w_bits=self.w_bits,
            names=",".join(self.names),
            digests=",".join(weight_digest(qw) for qw in self.qws),
            device=device,
            backend=backend,
        )
        self.prf = MaskPRF(secrets.token_bytes(32), self.field)  # key never leaves the enclave
        streams = [(i, d) for i in range(len(self.plans)) for d in (FORWARD, BACKWARD)]
        self.pool = FactorPool(self._make_factor, streams, self.rows, self.pool_size)
        self.engine = MaskedOffload(
            self.field,
            self.plans,
            self.pool,
            link,
            self.checks,
            self.check_rate,
            kernels=self.kernels,
        )
        made = self.pool.fill()
        return {**{f"accelerator_{k}": v for k, v in reply.items()}, "pool_made": made}

    # ------------------------------------------------------------------ training
    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        """Forward, backward and optimiser step; on any failure nothing changes."""
        rng = self.rng.state.clone()
        self.whole.train()
        try:
            with self.rng.active():
                logits = self.whole(
                    batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
                )  # (B, C) or (B, T, V)
                loss = task_loss(logits, batch["labels"], self.task)
                loss.backward()
        except BaseException:
            for p in self.optim.params:
                p.grad = None
            self.rng.state = rng  # the failed step drew nothing
            raise
        self.optim.step()  # clip, AdamW, schedule, zero_grad
        self.steps += 1
        if isinstance(self.engine, MaskedOffload) and self.steps == 1:
            self.pool.prune()  # streams the first step never used are not filled again
        return float(loss.detach())

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Eval-mode logits."""
        self.whole.eval()
        return self.whole(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))

    def stats(self) -> dict[str, MetaValue]:
        """Time split, traffic, pool and memory figures."""
        out: dict[str, MetaValue] = {"steps": self.steps, "peak_rss_bytes": _peak_rss_bytes()}
        if isinstance(self.engine, MaskedOffload):
            out["fused_kernels"] = self.kernels.fused
            out.update({f"offload_{k}": v for k, v in self.engine.stats.as_dict().items()})
            ps = self.pool.stats
            out.update(
                {
                    "pool_hits": ps.hits,
                    "pool_misses": ps.misses,
                    "pool_made": ps.made,
                    "pool_seconds_offline": ps.seconds_offline,
                    "pool_seconds_online": ps.seconds_online,
                    "pool_bytes": self.pool.nbytes(),
                    "masks_used": self.prf.used,
                }
            )
        return out

    # ------------------------------------------------------------------ state
    def new_optimizer(self, total_steps: int) -> None:
        """A fresh optimiser and schedule over ``total_steps`` (a federated round's training)."""
        self.optim = make_optim(
            self.adapter.trainable_parameters(), self.lr, self.train_cfg, total_steps
        )

    def load_adapter(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the adapter's tensors (a global adapter); refuse anything that does not fit.

        Raises:
            IntegrityError: Other names or shapes, or a non-finite value (nothing is loaded).
        """
        expected = self.adapter.state_dict()
        if set(tensors) != set(expected) or any(
            tensors[k].shape != v.shape or tensors[k].dtype != v.dtype for k, v in expected.items()
        ):
            raise IntegrityError("adapter refused: its tensors do not match this party's adapter")
        if not all(
            bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point()
        ):
            raise IntegrityError("adapter refused: it holds non-finite values")
        self.adapter.load_state_dict(dict(tensors))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Adapter tensors, AdamW moments and the step count (what is sealed)."""
        out = {f"{_ADAPTER}{k}": v for k, v in self.adapter.state_dict().items()}
        opt_state = self.optim.opt.state
        for i, p in enumerate(self.optim.params):
            for key, value in opt_state.get(p, {}).items():
                out[f"{_OPTIM}{i}.{key}"] = value.detach().clone().reshape(-1)
        out[f"{_OPTIM}steps"] = torch.tensor([self.steps], dtype=torch.int64)
        return out


# ---------------------------------------------------------------------- ECALLs
_PARTY: dict[str, ShieldedParty] = {}


def _party() -> ShieldedParty:
    party = _PARTY.get("party")
    if party is None:
        raise EnclaveError("shielded-party is not initialised: call 'init' first")
    return party


def _build(config: dict[str, MetaValue]) -> ShieldedParty:
    try:
        train = optim_from_settings(config)
        num_labels = config["num_labels"]
        return ShieldedParty(
            model=str(config["model"]),
            task=str(config["task"]),
            num_labels=None if num_labels is None else int(num_labels),  # type: ignore[arg-type]
            adapter=json.loads(str(config["adapter"])),
            lr=float(config["lr"]),  # type: ignore[arg-type]
            train=train,
            seed=int(config["seed"]),  # type: ignore[arg-type]
            total_steps=int(config["total_steps"]),  # type: ignore[arg-type]
            offload=bool(config["offload"]),
            w_bits=int(config["w_bits"]),  # type: ignore[arg-type]
            field_bits=int(config["field_bits"]),  # type: ignore[arg-type]
            max_bits=int(config["max_bits"]),  # type: ignore[arg-type]
            check_rate=float(config["check_rate"]),  # type: ignore[arg-type]
            pool_size=int(config["pool_size"]),  # type: ignore[arg-type]
            rows=int(config["rows"]),  # type: ignore[arg-type]
            clear_reference=bool(config.get("clear_reference", False)),
            fused=bool(config.get("fused", True)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"shielded-party config is incomplete or invalid: {err!r}") from None


_BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def _batch(request: Frame, labels: bool) -> dict[str, torch.Tensor]:
    extra = set(request.tensors) - set(_BATCH_KEYS)
    need = {"input_ids", "attention_mask"} | ({"labels"} if labels else set())
    missing = need - set(request.tensors)
    if extra or missing:
        raise EnclaveError(
            f"malformed batch refused: missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    ids = request.tensors["input_ids"]
    if ids.dim() != 2 or request.tensors["attention_mask"].shape != ids.shape:
        raise EnclaveError(f"malformed batch refused: input_ids {tuple(ids.shape)}")
    return {k: v.long() for k, v in request.tensors.items()}


@PROGRAM.ecall("init")
def init(ctx: EnclaveContext, request: Frame) -> Frame:
    """Build the model, adapter, optimiser and (with offload) the encoding plan, once."""
    if "party" not in _PARTY:
        _PARTY["party"] = _build(ctx.config)
    party = _party()
    if ctx.simulated:
        ctx.log.warning("shielded-party runs in a SIMULATED enclave (no hardware protection)")
    modules = [m for m in sorted(sys.modules) if m.startswith("shieldtune.")]
    return Frame(
        meta={
            **party.info,
            "trainable_params": party.optim.num_params(),
            "simulated": ctx.simulated,
            "measurement": ctx.measurement,
            "modules": modules,
        }
    )


@PROGRAM.ecall("attach")
def attach(ctx: EnclaveContext, request: Frame) -> Frame:
    """Connect the accelerator worker (socket path, device, backend override)."""
    meta = request.meta
    return Frame(
        meta=_party().attach(
            str(meta["socket"]), str(meta.get("device", "auto")), str(meta.get("backend", "auto"))
        )
    )


@PROGRAM.ecall("refill")
def refill(ctx: EnclaveContext, request: Frame) -> Frame:
    """Top up the pool of unmasking factors (offline work, timed apart from the steps)."""
    party = _party()
    if not isinstance(party.engine, MaskedOffload):
        return Frame(meta={"made": 0, "seconds": 0.0})
    start = time.perf_counter()
    made = party.pool.fill()
    return Frame(meta={"made": made, "seconds": time.perf_counter() - start})


@PROGRAM.ecall("train_step")
def train_step(ctx: EnclaveContext, request: Frame) -> Frame:
    """One training step on a batch sent over the channel; returns the loss."""
    party = _party()
    batch = _batch(request, labels=True)
    start = time.perf_counter()
    loss = party.train_step(batch)
    return Frame(meta={"loss": loss, "seconds": time.perf_counter() - start})


@PROGRAM.ecall("logits")
def logits(ctx: EnclaveContext, request: Frame) -> Frame:
    """Eval-mode logits of a batch (to the party at the other end of the channel)."""
    return Frame(tensors={"logits": _party().logits(_batch(request, labels=False)).float()})


@PROGRAM.ecall("stats")
def stats(ctx: EnclaveContext, request: Frame) -> Frame:
    """Time split, traffic, pool and memory figures."""
    return Frame(meta=_party().stats())


@PROGRAM.ecall("export_adapter")
def export_adapter(ctx: EnclaveContext, request: Frame) -> Frame:
    """The adapter's tensors, over the channel, if the measured config allows it."""
    if not ctx.config.get("allow_export"):
        raise EnclaveError("export_adapter refused: the measured config has allow_export false")
    party = _party()
    return Frame(meta={"steps": party.steps}, tensors=party.adapter.state_dict())


@PROGRAM.ecall("load_adapter")
def load_adapter(ctx: EnclaveContext, request: Frame) -> Frame:
    """Replace the adapter's tensors (a global adapter from the federation)."""
    party = _party()
    party.load_adapter(dict(request.tensors))
    return Frame(meta={"steps": party.steps})


@PROGRAM.ecall("checkpoint")
def checkpoint(ctx: EnclaveContext, request: Frame) -> Frame:
    """Copy the adapter and optimiser state into enclave state, for the host to seal."""
    party = _party()
    for key in [k for k in ctx.state if k.startswith((_ADAPTER, _OPTIM))]:
        del ctx.state[key]
    for key, value in party.state_tensors().items():
        ctx.state[key] = value
    return Frame(meta={"steps": party.steps, "tensors": len(ctx.state)})


# ---------------------------------------------------------------------- federation (ECALLs)
_FED: dict[str, Any] = {}  # the pending hello / the session with the server enclave (memory only)


def _records(records: list[bytes]) -> Frame:
    return Frame(tensors={f"record.{i}": bytes_to_tensor(r) for i, r in enumerate(records)})


def _fed_session() -> endpoint.ClientSession:
    session = _FED.get("session")
    if session is None:
        raise ChannelError("no channel session with the server enclave (handshake first)")
    return session


@PROGRAM.ecall("fed_hello")
def fed_hello(ctx: EnclaveContext, request: Frame) -> Frame:
    """Start a handshake with the server enclave (drops any earlier session)."""
    if not ctx.config.get("server_policy"):
        raise EnclaveError("fed_hello refused: the measured config names no server_policy")
    _FED.clear()
    pending = endpoint.start()
    _FED["pending"] = pending
    return Frame(tensors={"hello": bytes_to_tensor(pending.hello.to_bytes())})


@PROGRAM.ecall("fed_connect")
def fed_connect(ctx: EnclaveContext, request: Frame) -> Frame:
    """Verify the server enclave against the measured policy; then the first sealed fetch."""
    pending = _FED.pop("pending", None)
    if pending is None:
        raise ChannelError("connect without a hello: the server must start the handshake")
    policy = Policy.model_validate_json(str(ctx.config["server_policy"]))
    raw = tensor_to_bytes(request.tensors["server_hello"])
    session = endpoint.connect(pending, raw, Verifier(policy))
    _FED["session"] = session
    ctx.log.info("federation: verified the server enclave; session %s", session.client_id)
    return _records(session.reply(None))


@PROGRAM.ecall("fed_open")
def fed_open(ctx: EnclaveContext, request: Frame) -> Frame:
    """Open a round's records from the server enclave; load the global adapter if it has one."""
    session = _fed_session()
    records = [tensor_to_bytes(request.tensors[f"record.{i}"]) for i in range(len(request.tensors))]
    try:
        glob, refused = session.open_round(records)
        if glob is None:
            raise IntegrityError("the round carries no global adapter from the server enclave")
        if glob:  # empty before the first aggregation: keep the shared seeded initialisation
            _party().load_adapter(glob)
    except BaseException:
        _FED.pop("session", None)  # a refused record closes the session: handshake again
        raise
    listed: list[MetaValue] = list(refused)
    return Frame(meta={"round": session.global_round, "refused": listed})  # type: ignore[dict-item]


@PROGRAM.ecall("fed_seal")
def fed_seal(ctx: EnclaveContext, request: Frame) -> Frame:
    """Seal this party's adapter as its update (``submit``) if asked, then a ``fetch``."""
    session = _fed_session()
    update = _party().adapter.state_dict() if request.meta.get("submit") else None
    return _records(session.reply(update, request.meta_float("num_examples")))


@PROGRAM.ecall("new_round")
def new_round(ctx: EnclaveContext, request: Frame) -> Frame:
    """A fresh optimiser for a federated round of ``steps`` local steps."""
    steps = request.meta_int("steps")
    if steps <= 0:
        raise ConfigError(f"new_round: steps must be positive, got {steps}")
    _party().new_optimizer(steps)
    return Frame(meta={"steps": steps})
