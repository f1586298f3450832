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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from shieldtune.attacks.views import TensorSpec, WireTap, read_record, specs_of
from shieldtune.config import TrainConfig
from shieldtune.crypto.channel import client_hello, client_session, enclave_accept
from shieldtune.crypto.framing import encode_frame
from shieldtune.models import ModelSlice
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
