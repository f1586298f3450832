"""The attacker's view in each mode: what the server side can read, captured where it is read.

Split fine-tuning (surface ``cut-activations``), the server host operator:

- ``plain-split``: the server receives the client's cut-layer hidden states as they are
  (:func:`plain_split_view`: the client's own step, :func:`~shieldtune.split.step.client_forward`
  under the client's random stream, in the wire dtype);
- ``split``: the host relays the client's gRPC messages to its enclave.
  :func:`split_records` runs a real ``split-server`` enclave behind the real gRPC relay with a
  :class:`~shieldtune.attacks.views.WireTap` on it and a real
  :class:`~shieldtune.split.client.SplitClient`, and keeps each ``train_step`` request byte for
  byte; :func:`split_view` reads the hidden states out of them as the attacker can (layout-aware
  reinterpretation, :func:`~shieldtune.attacks.views.read_record`).

Both use the same client step under the same random stream, so on the plain path the two
views would be the same tensors: only the protection differs.

Federated (surface ``update``), the FedAvg host:

- ``plain-fedavg``: the update itself (the client's new adapter state);
- ``secure-fedavg``: the ``submit`` record :class:`~shieldtune.federated.mods.SealedUpdateMod`
  relays through the host (one frame with the update's tensors, sealed by an attested channel
  session): :func:`sealed_update_record` seals it with a real channel session the same way, and
  :func:`sealed_update_view` reads the tensors back as the attacker can.

Method 1 (surface ``accelerator``), the accelerator's operator:

- ``plain-offload``: the insecure counterpart, the same party, engine and worker with the masks
  removed (the pool hands out zero masks and zero factors), so the worker receives enc(x)
  itself;
- ``shielded``: the real one-time-padded operands.

:func:`victim_party` trains the secret adapter; :func:`accelerator_views` runs its evaluation
forwards under each view through a real worker process that saves every operand it receives
(its ``capture`` option); :func:`accelerator_passes` decodes them as the worker can (centred
field elements) and groups them into forward passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from shieldtune.attacks.views import TensorSpec, WireTap, read_record, specs_of
from shieldtune.config import TrainConfig
from shieldtune.crypto.channel import client_hello, client_session, enclave_accept
from shieldtune.crypto.framing import encode_frame
from shieldtune.models import ModelSlice
from shieldtune.shielded.field import from_field
from shieldtune.shielded.pool import FORWARD, Factor, FactorPool
from shieldtune.shielded.program import ShieldedParty
from shieldtune.shielded.worker import AcceleratorProcess
from shieldtune.split.client import SplitClient
from shieldtune.split.protocol import to_wire, wire_dtype_of
from shieldtune.split.service import SplitService, connect, program_config, split_policy
from shieldtune.split.step import client_forward
from shieldtune.training.rng import CLIENT_STREAM, RngStream

__all__ = [
    "plain_split_view",
    "split_records",
    "split_request_specs",
    "split_view",
    "sealed_update_record",
    "sealed_update_view",
    "ForwardPass",
    "read_accelerator_capture",
    "accelerator_passes",
    "accelerator_views",
    "victim_party",
]

Batch = dict[str, torch.Tensor]


def plain_split_view(
    front: ModelSlice,
    batches: Sequence[Batch],
    *,
    seed: int,
    precision: str = "float32",
    wire_dtype: str = "float32",
) -> list[torch.Tensor]:
    """What a plain-split server receives: the client's (B, T, d) hidden states per batch.

    Args:
        front: The client's front slice (frozen; run in train mode, as a training client does).
        batches: The victim's batches.
        seed: Run seed (the client's random stream is ``seed + CLIENT_STREAM``).
        precision: Autocast of the client forward.
        wire_dtype: Dtype the hidden states travel in.

    Returns:
        One float32 (B, T, d) tensor per batch.
    """
    rng = RngStream(seed + CLIENT_STREAM)
    front.train()
    views = []
    with torch.no_grad():
        for batch in batches:
            with rng.active():
                hidden = client_forward(front, batch, precision)  # (B, T, d)
            views.append(to_wire(hidden, wire_dtype).float())
    return views


def split_records(
    model: str,
    front: ModelSlice,
    batches: Sequence[Batch],
    *,
    cut: int,
    num_labels: int,
    seed: int,
    precision: str = "float32",
    wire_dtype: str = "float32",
    platform_key: Path | None = None,
) -> list[bytes]:
    """Train through a real split-server enclave and keep what its host receives per step.

    Args:
        model: Preset or folder the enclave loads (the same model the front was cut from).
        front: The client's front slice (frozen).
        batches: The victim's batches (seq-cls: with ``labels``).
        cut: Layers the front runs (part of the enclave's measured config).
        num_labels: Classes of the victim's task.
        seed: Run seed (client random stream as in :func:`plain_split_view`).
        precision: Autocast of both sides.
        wire_dtype: Dtype of hidden states and gradients on the wire.
        platform_key: Secret file of the simulated platform (None: the default location).

    Returns:
        The gRPC message bytes of each batch's ``train_step`` request, in batch order.
    """
    train = TrainConfig(schedule="constant", warmup_ratio=0.0, precision=precision)
    program = program_config(
        model=model,
        task="seq-cls",
        num_labels=num_labels,
        cut=cut,
        adapter={"method": "lora", "rank": 4},
        lr=train.lr,
        train=train,
        seed=seed,
        total_steps=len(batches),
        wire_dtype=wire_dtype,
    )
    tap = WireTap()
    with SplitService(program, platform_key=platform_key, interceptors=[tap]) as service:
        keys = [service.platform_public_key] if service.platform_public_key else []
        policy = split_policy(program, allow_simulated=True, simulated_platform_keys=keys)
        remote, transport = connect(service.address, policy, wire_dtype=wire_dtype)
        try:
            remote.init()
            client = SplitClient(
                front,
                remote,
                task="seq-cls",
                precision=precision,
                rng=RngStream(seed + CLIENT_STREAM),
            )
            records = []
            for batch in batches:
                before = len(tap.received())
                client.train_step(batch)
                step = tap.received()[before:]
                if len(step) != 1:
                    raise RuntimeError(f"expected one record per train_step, tapped {len(step)}")
                records.extend(step)
            client.finish()
        finally:
            transport.close()
    return records


def split_request_specs(batch: Batch, hidden_size: int, wire_dtype: str) -> list[TensorSpec]:
    """The tensors of a ``train_step`` request, in frame order, for a batch of this shape.

    Public knowledge: the split protocol fixes the names and order; the record's length
    reveals B·T.
    """
    b, t = batch["input_ids"].shape
    return [
        TensorSpec("hidden", (b, t, hidden_size), wire_dtype_of(wire_dtype)),
        TensorSpec("attention_mask", (b, t), torch.int64),
        TensorSpec("labels", tuple(batch["labels"].shape), torch.int64),
    ]


def split_view(
    record: bytes, batch: Batch, hidden_size: int, wire_dtype: str, *, sealed: bool = True
) -> torch.Tensor:
    """The attacker's reading of the hidden states in one captured request.

    Args:
        record: The captured message (a sealed record, or a plain frame with ``sealed=False``).
        batch: The batch it carried (only its shape is used).
        hidden_size: d.
        wire_dtype: Wire dtype of the hidden states.
        sealed: Whether ``record`` is a channel record.

    Returns:
        (B, T, d) float32, non-finite values set to 0.
    """
    specs = split_request_specs(batch, hidden_size, wire_dtype)
    return read_record(record, specs, sealed=sealed)["hidden"]


def sealed_update_record(update: Mapping[str, torch.Tensor], num_examples: int) -> bytes:
    """A ``submit`` record as the secure-FedAvg host relays it (fresh attested-channel keys).

    The frame is ``SealedUpdateMod``'s: metadata (ecall, client, round, examples) and the
    update's tensors; the channel is the real one (X25519 + HKDF + AES-256-GCM). The keys are
    generated here and dropped: the attacker never has them.
    """
    keys, hello = client_hello()
    enclave_public, _, _ = enclave_accept(hello)
    session = client_session(keys, hello, enclave_public)
    meta = {"ecall": "submit", "client": "0" * 16, "round": 1, "num_examples": float(num_examples)}
    return bytes(session.seal(encode_frame(meta, dict(update))))


def sealed_update_view(
    record: bytes, public_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The attacker's reading of an update out of a sealed ``submit`` record.

    Args:
        record: The captured record.
        public_state: A state with the update's structure the attacker already holds (the
            global adapter). Its integer tensors (SPF indices, fixed by the public weights and
            seed) are used as they are; the floating ones are read from the record.

    Returns:
        ``name -> tensor`` with the floating tensors reinterpreted from the ciphertext.
    """
    read = read_record(record, specs_of(public_state), sealed=True)
    return {
        name: read[name].to(t.dtype) if t.is_floating_point() else t.clone()
        for name, t in public_state.items()
    }


# --------------------------------------------------------------------------- Method 1
@dataclass
class ForwardPass:
    """One forward pass as the accelerator received it.

    Attributes:
        operands: ``map id -> (n, d_in)`` float64 operand rows (a map's consecutive calls, e.g.
            chunks of at most the pool's rows, concatenated).
        training: Whether backward operands followed it (a training step).
    """

    operands: dict[int, torch.Tensor] = field(default_factory=dict)
    training: bool = False


def read_accelerator_capture(folder: Path) -> list[tuple[str, torch.Tensor]]:
    """What a worker started with ``capture=folder`` saved: ``(call, operand)`` in arrival order.

    ``call`` is ``forward:<map id>`` or ``backward:<map id>``; the operand is int64 in [0, p).
    """
    records = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            records.append((f.metadata()["call"], f.get_tensor("sent")))
    return records


def accelerator_passes(records: Sequence[tuple[str, torch.Tensor]], p: int) -> list[ForwardPass]:
    """Group captured operands into forward passes, decoded as the worker can.

    A pass starts at a forward call for a map whose id is below the previous forward's, or that
    follows a backward call; a map's consecutive calls are one operand. The worker knows p (it
    is in its setup) and reads each element centred: on the plain offload that is the encoded
    input itself, on the shielded one a uniform residue.

    Args:
        records: ``(call, operand)`` as :func:`read_accelerator_capture` returns them.
        p: The field's prime.

    Returns:
        The passes in order.
    """
    passes: list[ForwardPass] = []
    parts: dict[int, list[torch.Tensor]] = {}
    last = -1
    for call, sent in records:
        direction, layer = call.split(":")
        if direction == "backward":
            if passes:
                passes[-1].training = True
            continue
        if int(layer) < last or not passes or passes[-1].training:
            passes.append(ForwardPass())
            parts = {}
        parts.setdefault(int(layer), []).append(from_field(sent, p).to(torch.float64))
        passes[-1].operands[int(layer)] = torch.cat(parts[int(layer)])
        last = int(layer)
    return passes


def _zero_pool(party: ShieldedParty) -> FactorPool:
    """A pool of zero masks and zero factors for the party's maps: the masks removed."""

    def zero(layer: int, direction: int, counter: tuple, rows: int) -> Factor:
        out_f, in_f = party.plans[layer].shape
        sent, got = (in_f, out_f) if direction == FORWARD else (out_f, in_f)
        zeros = torch.zeros
        return Factor(
            counter, zeros(rows, sent, dtype=torch.int64), zeros(rows, got, dtype=torch.int64)
        )

    return FactorPool(zero, party.pool.streams, party.pool.rows, 0)


def accelerator_views(
    party: ShieldedParty,
    batches: Sequence[Batch],
    folder: Path,
    modes: Sequence[str] = ("plain-offload", "shielded"),
) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """What one worker receives while a party evaluates ``batches`` once per mode.

    The party (offloading; trained or not) is attached to a new worker process that saves
    every operand (its ``capture`` option, in ``folder``); the worker is stopped on return,
    and the party must be attached again before it trains on. The same adapter state is seen
    under each mode, in eval mode (no dropout).

    Args:
        party: The party (its adapter is the secret).
        batches: The batches whose logits it computes.
        folder: Where the worker saves the operands (created).
        modes: ``shielded`` (the real masks) and/or ``plain-offload`` (the masks removed: the
            pool hands out zero masks and factors, so the worker receives enc(x) itself).

    Returns:
        ``mode -> (call, operand)`` in arrival order (:func:`read_accelerator_capture`).

    Raises:
        ValueError: An unknown mode.
    """
    bad = [m for m in modes if m not in ("plain-offload", "shielded")]
    if bad:
        raise ValueError(f"unknown accelerator views {bad}; accepted: plain-offload, shielded")
    views, seen = {}, 0
    with AcceleratorProcess(capture=folder, capture_limit=2**31 - 1) as accel:
        party.attach(accel.socket_path, "cpu", "auto")
        masked = party.engine.pool
        for mode in modes:
            party.engine.pool = masked if mode == "shielded" else _zero_pool(party)
            for batch in batches:
                party.logits(batch)
            records = read_accelerator_capture(folder)  # the worker saves before it replies
            views[mode], seen = records[seen:], len(records)
    return views


def victim_party(
    model: str,
    adapter: Mapping[str, object],
    batches: Sequence[Batch],
    *,
    task: str = "seq-cls",
    num_labels: int | None = 2,
    lr: float = 1e-2,
    w_bits: int = 12,
    seed: int = 0,
    rows: int = 256,
    fused: bool = True,
) -> ShieldedParty:
    """The victim of Method 1: an offloading party trained one step per batch of ``batches``.

    It trains on the clear fixed-point path of its own engine (``clear_reference``), which
    equals the masked path bit for bit (``tests/shielded/test_offload.py``), so the adapter is
    the one a masked run gives, without a worker; :func:`accelerator_views` attaches one.

    Args:
        model, adapter, task, num_labels, lr, w_bits, seed: The party's settings.
        batches: Its training batches (with labels).
        rows: Rows per mask (the largest B·T it will send at once).
        fused: Fused elementwise kernels (compiled on first use; the same arithmetic either way).
    """
    party = ShieldedParty(
        model=model,
        task=task,
        num_labels=num_labels,
        adapter=dict(adapter),
        lr=lr,
        train=TrainConfig(lr=lr, schedule="constant", warmup_ratio=0.0),
        seed=seed,
        total_steps=max(len(batches), 1),
        offload=True,
        w_bits=w_bits,
        field_bits=0,
        max_bits=0,
        check_rate=1.0,
        pool_size=0,
        rows=rows,
        clear_reference=True,
        fused=fused,
    )
    for batch in batches:
        party.train_step(batch)
    return party
