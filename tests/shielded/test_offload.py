"""Method 1 offload: exact against clear fixed point, close to float32, refuses a lying worker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _shielded import make_party
from _tiny import padded_batch

from shieldtune.errors import IntegrityError
from shieldtune.shielded.linear import OffloadedLinear, frozen_linears
from shieldtune.shielded.worker import AcceleratorProcess
from shieldtune.tee.audit import AuditLog


def _batch(seed: int = 0, task: str = "seq-cls") -> dict[str, torch.Tensor]:
    """A padded batch of a learnable task: the class is the first token."""
    ids, mask = padded_batch(batch=4, seq=16, seed=seed)
    if task == "seq-cls":
        labels = torch.tensor([0, 1, 1, 0])
        ids[:, 1] = 5 + labels
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _adapter(party) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {k: v.detach().clone() for k, v in party.adapter.state_dict().items()}


def test_only_frozen_maps_are_offloaded() -> None:
    party = make_party(clear_reference=True)
    offloaded = [m for m in party.whole.modules() if isinstance(m, OffloadedLinear)]
    assert len(offloaded) == len(party.plans) > 0
    assert not frozen_linears(party.whole)  # nothing frozen is left behind in the clear
    trainable = {id(p) for p in party.adapter.trainable_parameters()}
    for module in offloaded:  # an offloaded map never holds a trained tensor
        assert all(id(p) not in trainable for p in module.parameters())


@pytest.mark.parametrize(("model", "task"), [("tiny-llama", "seq-cls"), ("tiny-gpt2", "causal-lm")])
def test_masked_equals_clear_fixed_point_bit_for_bit(worker, model: str, task: str) -> None:
    clear = make_party(model, task, clear_reference=True)
    masked = make_party(model, task)
    masked.attach(worker().socket_path, "cpu", "auto")
    # per map, forward and backward, on the same operands
    gen = torch.Generator().manual_seed(1)
    for i, plan in enumerate(masked.plans):
        out_f, in_f = plan.shape
        x, g = torch.randn(64, in_f, generator=gen), torch.randn(64, out_f, generator=gen)
        assert torch.equal(masked.engine.forward(i, x), clear.engine.forward(i, x)), i
        assert torch.equal(masked.engine.backward(i, g), clear.engine.backward(i, g)), i
    # whole steps: identical losses and identical adapters after them
    for step in range(3):
        batch = _batch(step, task)
        assert masked.train_step(batch) == clear.train_step(batch)
    for key, value in _adapter(clear).items():
        assert torch.equal(_adapter(masked)[key], value), key


def _keyword_batches(vocab: int, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` distinct batches (8 × 32) of a learnable task: the class is the first token."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(10, min(vocab, 2000), (8, 32), generator=gen)
        labels = torch.randint(0, 2, (8,), generator=gen)
        ids[:, 1] = 5 + labels
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


@pytest.mark.parametrize(
    ("model", "adapter"),
    [
        ("tiny-llama", {"method": "lora", "rank": 4}),
        ("tiny-llama", {"method": "prefix", "num_virtual_tokens": 4}),
        ("minilm", {"method": "lora", "rank": 4}),
    ],
)
def test_shielded_stays_close_to_float32_training(worker, model: str, adapter: dict) -> None:
    # the same run as benchmarks/shielded_encoding_error.py (lr 1e-3, 20 distinct batches)
    plain = make_party(model, adapter=adapter, offload=False, lr=1e-3, rows=256)
    shielded = make_party(model, adapter=adapter, lr=1e-3, rows=256)
    shielded.attach(worker().socket_path, "cpu", "auto")
    for batch in _keyword_batches(plain.whole.config.vocab_size, 20):
        want, got = plain.train_step(batch), shielded.train_step(batch)
    assert abs(got - want) <= 1e-3 * abs(want), (got, want)  # after 20 steps, default encoding


def test_every_operand_the_accelerator_saw_was_masked(worker, tmp_path) -> None:
    accel = worker(audit=tmp_path / "seen.jsonl")
    party = make_party()
    party.attach(accel.socket_path, "cpu", "auto")
    party.train_step(_batch())
    records = AuditLog.read_jsonl(tmp_path / "seen.jsonl")
    assert records and all(r.protection == "masked" for r in records)
    sent = [r for r in records if r.direction == "enclave->host"]
    stats = party.stats()
    assert len(sent) == stats["offload_products"]  # every product went out masked, once
    assert stats["masks_used"] >= stats["offload_products"]  # each with its own mask


def _snapshot(party) -> tuple:  # noqa: ANN001
    moments = {
        id(p): {k: v.clone() for k, v in st.items()} for p, st in party.optim.opt.state.items()
    }
    return _adapter(party), party.steps, moments, party.rng.state.clone()


@pytest.mark.parametrize("tamper", ["flip", "shape"])
def test_a_lying_accelerator_aborts_the_step_and_changes_nothing(worker, tamper: str) -> None:
    accel: AcceleratorProcess = worker(tamper=tamper, tamper_after=60)  # lies mid-step 2 or 3
    party = make_party()
    party.attach(accel.socket_path, "cpu", "auto")
    honest = 0
    with pytest.raises(IntegrityError, match="Freivalds|expected"):
        for seed in range(10):
            before = _snapshot(party)
            party.train_step(_batch(seed))
            honest += 1
    assert honest >= 1  # at least one step went through before the lie
    adapter, steps, moments, rng = before
    assert party.steps == steps
    for key, value in adapter.items():
        assert torch.equal(_adapter(party)[key], value), key
    assert all(p.grad is None for p in party.optim.params)
    for p, state in party.optim.opt.state.items():
        for k, v in state.items():
            assert torch.equal(v, moments[id(p)][k])
    assert torch.equal(party.rng.state, rng)  # the failed step drew no dropout either


def test_no_check_no_detection_shows_the_check_is_what_catches_it(worker) -> None:
    # negative control: with Freivalds off, the same lie goes unnoticed (wrong but silent)
    accel = worker(tamper="flip", tamper_after=0)
    party = make_party(check_rate=0.0)
    party.attach(accel.socket_path, "cpu", "auto")
    party.train_step(_batch(0))  # no error: the check is the only defence against a liar
    assert party.engine.stats.checks_failed == 0


def test_masked_equals_clear_on_the_real_llm_shortened(worker) -> None:
    """SmolLM2 (its first 2 layers, real weights): the tied 49,152-wide LM head needs a larger
    prime than one float64 GEMM allows; the step is still exact against clear fixed point."""
    import importlib.util

    from shieldtune.models import smollm2

    if importlib.util.find_spec(smollm2.MODULE) is None:
        pytest.skip(f"{smollm2.DISTRIBUTION} is not installed (`{smollm2.INSTALL_COMMAND}`)")
    folder = str(smollm2.smollm2_folder(num_layers=2))
    opts = {"model": folder, "task": "causal-lm", "rows": 32}
    clear, masked = make_party(clear_reference=True, **opts), make_party(**opts)
    masked.attach(worker().socket_path, "cpu", "auto")
    assert masked.field.bits > 53 - 27  # more than one float64 GEMM's prime: limbs
    head = max(range(len(masked.plans)), key=lambda i: masked.plans[i].qw.col_l1)
    assert masked.plans[head].shape[0] == 49152 and masked.plans[head].bwd_bits >= 8
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(32, 576, generator=gen), torch.randn(32, 49152, generator=gen)
    assert torch.equal(masked.engine.forward(head, x), clear.engine.forward(head, x))
    assert torch.equal(masked.engine.backward(head, g), clear.engine.backward(head, g))
    ids = torch.randint(10, 2000, (2, 16), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    loss = masked.train_step(batch)
    assert loss == clear.train_step(batch) and loss == loss  # finite and identical
    for key, value in _adapter(clear).items():
        assert torch.equal(_adapter(masked)[key], value), key


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited


def test_a_worker_never_outlives_its_host(tmp_path) -> None:
    """A host killed without cleanup (SIGKILL) leaves no accelerator worker behind."""
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import time\n"
        "from shieldtune.shielded.worker import AcceleratorProcess\n"
        "a = AcceleratorProcess().start()\n"
        "print(a.proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    host = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(host.stdout.readline())  # type: ignore[union-attr]
        assert _alive(worker_pid)
        host.send_signal(signal.SIGKILL)
        host.wait()
        deadline = time.monotonic() + 20
        while _alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker_pid)
    finally:
        host.kill()
