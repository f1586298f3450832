"""The split service over real gRPC on loopback: nothing clear crosses, refusals, faults."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import shieldtune.split.client as client_module
from shieldtune.attacks.views import WireTap
from shieldtune.crypto.framing import encode_frame
from shieldtune.errors import AttestationError, ChannelError
from shieldtune.models import load_model, slice_model
from shieldtune.split.client import SplitClient, SplitRemote, attach_front_adapter
from shieldtune.split.service import SplitService, connect, split_policy
from shieldtune.tee.attestation import Verifier
from shieldtune.tee.audit import AuditLog
from shieldtune.tee.client import SecureClient
from shieldtune.tee.program import measured_modules
from shieldtune.training.rng import RngStream
from shieldtune.training.steps import make_optim
from shieldtune.transport.grpc_client import GrpcTransport

from .conftest import LIMIT

pytestmark = pytest.mark.integration
#: Tensor names allowed to cross the enclave boundary in the clear (public or simulation-only).
CLEAR_OK = {"config", "sealing_key", "hello", "enclave_public", "report_data"}


def _policy(service: SplitService, program: dict, allow_simulated: bool = True):
    keys = [service.platform_public_key] if service.platform_public_key else []
    return split_policy(program, allow_simulated=allow_simulated, simulated_platform_keys=keys)


def _connect(service: SplitService, program: dict) -> tuple[SplitRemote, GrpcTransport]:
    remote, transport = connect(service.address, _policy(service, program), max_message_bytes=LIMIT)
    remote.init()
    return remote, transport


def _raw(service: SplitService, program: dict, send: Callable) -> tuple[SplitRemote, GrpcTransport]:
    """A session whose records pass through ``send(transport, record)`` (tamper, replay)."""
    transport = GrpcTransport(service.address, max_message_bytes=LIMIT)
    secure = SecureClient.connect(
        Verifier(_policy(service, program)), transport.handshake, lambda r: send(transport, r)
    )
    remote = SplitRemote(secure.call)
    remote.init()
    return remote, transport


def _hidden(b: int = 2, t: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return (
        torch.randn(b, t, 64, generator=gen),
        torch.ones(b, t, dtype=torch.long),
        torch.zeros(b, dtype=torch.long),
    )


def test_training_through_the_service_sends_nothing_in_the_clear(
    split_service: SplitService,
    tiny_program: dict,
    tap: WireTap,
    audit: AuditLog,
    make_batch: Callable[..., dict],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a client with SPF on the front slice; record what it computes in the clear
    computed: list[torch.Tensor] = []
    forward = client_module.client_forward

    def spy_forward(*args: Any) -> torch.Tensor:
        hidden = forward(*args)
        computed.append(hidden.detach().clone())
        return hidden

    monkeypatch.setattr(client_module, "client_forward", spy_forward)
    remote, transport = _connect(split_service, tiny_program)
    train_step = remote.train_step

    def spy_step(*args: Any) -> tuple[float, torch.Tensor]:
        loss, grad = train_step(*args)
        computed.append(grad.clone())
        return loss, grad

    monkeypatch.setattr(remote, "train_step", spy_step)
    eval_step = remote.eval_step

    def spy_eval(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        computed.append(hidden.detach().clone())
        return eval_step(hidden, mask)

    monkeypatch.setattr(remote, "eval_step", spy_eval)
    model = load_model("tiny-llama", "seq-cls", 2, seed=0).model
    front, _ = slice_model(model, 2)
    for p in front.parameters():
        p.requires_grad_(False)
    spec = {"method": "spf", "density": 0.05, "saliency": "magnitude"}
    spf = attach_front_adapter(front, model, spec, remote, make_batch(), batch_size=4, seed=0)
    client = SplitClient(
        front,
        remote,
        task="seq-cls",
        precision="float32",
        rng=RngStream(0),
        optim=make_optim(spf.trainable_parameters(), 1e-3),
    )
    first_message = len(tap.messages)
    # Execute: three steps and an evaluation over real gRPC
    losses = [client.train_step(make_batch(seed=s)) for s in range(3)]
    logits = client.logits(make_batch(seed=9))
    client.finish()
    modules = remote.init()["modules"]
    transport.close()
    # Assert: it trained and evaluated through the channel
    assert all(loss > 0 for loss in losses) and logits.shape == (4, 2)
    assert len(computed) == 7  # 4 hidden-state tensors (3 steps + eval) and 3 gradients
    # ...no row of any hidden state or gradient appears in the captured gRPC bytes
    wire = b"".join(m[2] for m in tap.messages[first_message:])
    assert wire and {m[0].rsplit("/", 1)[1] for m in tap.messages} == {"Handshake", "Session"}
    for tensor in computed:
        plain = encode_frame({}, {"x": tensor})  # control: a plain frame does contain the rows
        for b, t in [(0, 0), (1, 3), (3, 6)]:
            row = tensor[b, t].float().numpy().tobytes()  # 256 bytes, a real (unpadded) token
            assert any(row) and row in plain and row not in wire
    # ...and the enclave boundary saw only ciphertext once the channel was up
    for crossing in audit.records:
        if crossing.protection == "clear":
            assert {t.name for t in crossing.tensors} <= CLEAR_OK, crossing
        if crossing.call == "channel_call":
            assert crossing.protection == "encrypted"
            assert [t.name for t in crossing.tensors] == ["record"]
    for name in ("hidden", "grad", "labels", "attention_mask", "logits", "*lora*", "*score*"):
        audit.assert_nothing_clear(name)
    # every project module the enclave loaded is part of its measurement
    assert isinstance(modules, list) and set(modules) <= set(measured_modules("split-server"))


def test_each_refusal_names_its_cause_and_other_sessions_keep_working(
    split_service: SplitService, tiny_program: dict
) -> None:
    # Prepare
    healthy, _ = _connect(split_service, tiny_program)
    hidden, mask, labels = _hidden()

    def still_works() -> None:
        assert healthy.eval_step(hidden, mask).shape == (2, 2)

    flip = {"on": False}

    def tamper(transport: GrpcTransport, record: bytes) -> bytes:
        data = bytearray(record)
        if flip["on"]:
            data[-3] ^= 0x01
        return transport.send(bytes(data))

    sent: list[bytes] = []

    def remember(transport: GrpcTransport, record: bytes) -> bytes:
        sent.append(bytes(record))
        return transport.send(record)

    # Execute / Assert: a tampered record
    tampered, _ = _raw(split_service, tiny_program, tamper)
    flip["on"] = True
    with pytest.raises(ChannelError, match="INVALID_ARGUMENT.*failed authentication"):
        tampered.eval_step(hidden, mask)
    still_works()
    # a replayed record
    replaying, t_replay = _raw(split_service, tiny_program, remember)
    with pytest.raises(ChannelError, match="INVALID_ARGUMENT.*replayed"):
        t_replay.send(sent[-1])
    still_works()
    # a simulated quote without the explicit opt-in, and a client expecting another build
    with pytest.raises(AttestationError, match="SIMULATED.*allow_simulated is false"):
        connect(split_service.address, _policy(split_service, tiny_program, False))
    other = {**tiny_program, "lr": 0.5}
    with pytest.raises(AttestationError, match="not in policy.allowed_measurements"):
        connect(split_service.address, _policy(split_service, other))
    still_works()
    # an oversized frame (above the relay's max message size)
    big, _ = _connect(split_service, tiny_program)
    huge = torch.zeros(8, 600, 64)  # 1.2 MB > 1 MiB
    with pytest.raises(ChannelError, match="RESOURCE_EXHAUSTED"):
        big.eval_step(huge, torch.ones(8, 600, dtype=torch.long))
    still_works()
    # a malformed request inside the channel: refused by the enclave, the session lives on
    malformed, _ = _connect(split_service, tiny_program)
    with pytest.raises(
        ChannelError, match=r"malformed 'train_step'.*hidden is float32 \[2, 6, 32\]"
    ):
        malformed.train_step(hidden[..., :32], mask, labels)
    assert malformed.eval_step(hidden, mask).shape == (2, 2)
    still_works()


def test_a_client_disconnecting_mid_step_leaves_the_server_adapter_unchanged(
    split_service: SplitService, tiny_program: dict
) -> None:
    # Prepare
    watcher, _ = _connect(split_service, tiny_program)
    before = watcher.export_adapter()
    hidden, mask, labels = _hidden()
    # Execute: one client gets its gradient and vanishes before its half of the step...
    gone, t_gone = _connect(split_service, tiny_program)
    loss, grad = gone.train_step(hidden, mask, labels)
    t_gone.disconnect()
    # ...another drops the connection while its request is in flight
    dropped, t_dropped = _connect(split_service, tiny_program)
    errors: list[BaseException] = []

    def in_flight() -> None:
        try:
            dropped.train_step(hidden, mask, labels)
        except ChannelError as err:
            errors.append(err)

    worker = threading.Thread(target=in_flight)
    worker.start()
    t_dropped.disconnect()
    worker.join(timeout=30)
    after = watcher.export_adapter()
    # Assert: no half-done step was applied
    assert loss > 0 and grad.shape == hidden.shape
    assert set(after) == set(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    # control: a step its client commits does change the adapter
    committed, _ = _connect(split_service, tiny_program)
    committed.train_step(hidden, mask, labels)
    committed.commit()
    changed = watcher.export_adapter()
    assert any(not torch.equal(changed[n], v) for n, v in before.items())


def test_sealed_state_survives_a_server_restart(
    split_service: SplitService, tiny_program: dict, platform_key: Path, tmp_path: Path
) -> None:
    # Prepare: checkpoint through the channel, the host seals (it never sees the tensors)
    client, _ = _connect(split_service, tiny_program)
    steps = client.checkpoint()
    exported = client.export_adapter()
    sealed = tmp_path / "back_adapter.sealed"
    split_service.seal(sealed)
    assert b"lora" not in sealed.read_bytes()
    # Execute: a new enclave of the same build restores the state before its first client
    with SplitService(tiny_program, platform_key=platform_key) as restarted:
        restarted.unseal(sealed)
        remote, _ = connect(restarted.address, _policy(restarted, tiny_program))
        info = remote.init()
        restored = remote.export_adapter()
    # Assert
    assert info["restored"] is True and info["steps"] == steps
    for name, value in exported.items():
        assert torch.equal(restored[name], value), name
