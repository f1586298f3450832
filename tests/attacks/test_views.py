"""The attacker's byte-level reading: exact on a plain frame, whitened on a sealed record."""

from __future__ import annotations

import pytest
import torch

from shieldtune.attacks.capture import (
    sealed_update_record,
    sealed_update_view,
    split_request_specs,
    split_view,
)
from shieldtune.attacks.views import AEAD_TAG_BYTES, read_record, read_tail, specs_of
from shieldtune.crypto.channel import client_hello, client_session, enclave_accept
from shieldtune.crypto.framing import encode_frame


def _request(wire: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(3, 5, 8, generator=gen).to(wire),
        "attention_mask": torch.ones(3, 5, dtype=torch.long),
        "labels": torch.tensor([0, 1, 0]),
    }


def _seal(frame: bytes) -> bytes:
    keys, hello = client_hello()
    enclave_public, _, _ = enclave_accept(hello)
    return bytes(client_session(keys, hello, enclave_public).seal(frame))


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
@pytest.mark.parametrize("meta", [{}, {"ecall": "train_step", "commit": "ab" * 16}])
def test_layout_reading_of_a_plain_frame_is_exact(wire: str, meta: dict) -> None:
    # Prepare: a train_step request as the split client frames it (any metadata length)
    tensors = _request(getattr(torch, wire))
    frame = encode_frame(meta, tensors)
    batch = {"input_ids": torch.zeros(3, 5, dtype=torch.long), "labels": tensors["labels"]}
    # Execute
    read = read_tail(frame, split_request_specs(batch, 8, wire))
    hidden = split_view(frame, batch, 8, wire, sealed=False)
    # Assert: every tensor comes back bit for bit
    for name, t in tensors.items():
        assert torch.equal(read[name], t), name
    torch.testing.assert_close(hidden, tensors["hidden"].float(), rtol=0, atol=0)


def test_layout_reading_of_a_sealed_record_is_shaped_noise() -> None:
    # Prepare: the same request sealed by a real channel session
    tensors = _request(torch.float32)
    frame = encode_frame({"ecall": "train_step"}, tensors)
    record = _seal(frame)
    # Execute
    read = read_record(record, specs_of(tensors), sealed=True)
    # Assert: right shapes, and nothing of the plaintext survives
    assert len(record) == len(frame) + 14 + AEAD_TAG_BYTES  # header ‖ ciphertext ‖ tag
    assert read["hidden"].shape == tensors["hidden"].shape
    assert bool(torch.isfinite(read["hidden"]).all())  # sanitized
    assert not torch.equal(read["attention_mask"], tensors["attention_mask"])
    matches = (read["hidden"] == tensors["hidden"]).float().mean()
    assert matches < 0.01
    corr = torch.corrcoef(
        torch.stack([read["hidden"].flatten().clamp(-1e3, 1e3), tensors["hidden"].flatten()])
    )[0, 1]
    assert abs(float(corr)) < 0.5
    # the same reading of the plaintext frame at the same offsets is the plaintext
    aligned = read_record(frame + bytes(AEAD_TAG_BYTES), specs_of(tensors), sealed=True)
    assert torch.equal(aligned["hidden"], tensors["hidden"])


def test_a_payload_too_short_for_the_layout_is_refused() -> None:
    specs = specs_of(_request(torch.float32))
    with pytest.raises(ValueError, match="too short"):
        read_tail(b"\x00" * 100, specs)


def test_sealed_update_view_keeps_public_integer_tensors_and_garbles_the_rest() -> None:
    gen = torch.Generator().manual_seed(0)
    update = {"lora_A": torch.randn(4, 8, generator=gen), "idx": torch.arange(6)}
    start = {"lora_A": torch.zeros(4, 8), "idx": torch.arange(6)}
    view = sealed_update_view(sealed_update_record(update, 10), start)
    assert torch.equal(view["idx"], start["idx"])
    assert view["lora_A"].shape == (4, 8) and not torch.equal(view["lora_A"], update["lora_A"])
    # two seals of the same update read differently: fresh keys, fresh keystream
    again = sealed_update_view(sealed_update_record(update, 10), start)
    assert not torch.equal(again["lora_A"], view["lora_A"])
