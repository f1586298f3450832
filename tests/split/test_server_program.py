"""The split-server program in process (no enclave): staged steps, commits, refusals."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from shieldtune.adapters import ADAPTERS
from shieldtune.config import adapter_settings
from shieldtune.crypto.framing import Frame
from shieldtune.errors import ChannelError, EnclaveError
from shieldtune.models import load_model, slice_model
from shieldtune.split import server_program
from shieldtune.split.server_program import PROGRAM
from shieldtune.split.step import server_step
from shieldtune.tee.program import EnclaveContext, TrackedState
from shieldtune.training.rng import SERVER_STREAM, RngStream
from shieldtune.training.steps import make_optim


def _context(config: dict[str, Any]) -> EnclaveContext:
    return EnclaveContext(
        program="split-server",
        measurement="0" * 64,
        config=dict(config),
        state=TrackedState(1 << 30),
        simulated=True,
        log=logging.getLogger("test"),
    )


@pytest.fixture(scope="module")
def live(tiny_program: dict[str, Any]) -> Iterator[tuple[EnclaveContext, Any]]:
    """An initialised program instance shared by the tests that leave it as they found it."""
    server_program._SERVER.clear()  # noqa: SLF001
    context = _context(tiny_program)
    PROGRAM.dispatch(context, "init", Frame())
    yield context, server_program._SERVER["server"]  # noqa: SLF001
    server_program._SERVER.clear()  # noqa: SLF001


@pytest.fixture
def shared(live: tuple[EnclaveContext, Any]) -> EnclaveContext:
    server_program._SERVER["server"] = live[1]  # noqa: SLF001
    return live[0]


@pytest.fixture
def ctx(tiny_program: dict[str, Any]) -> Iterator[EnclaveContext]:
    """A fresh, uninitialised program instance."""
    kept = server_program._SERVER.pop("server", None)  # noqa: SLF001
    yield _context(tiny_program)
    server_program._SERVER.clear()  # noqa: SLF001
    if kept is not None:
        server_program._SERVER["server"] = kept  # noqa: SLF001


def _call(ctx: EnclaveContext, ecall: str, tensors: dict | None = None, **meta: Any) -> Frame:
    return PROGRAM.dispatch(ctx, ecall, Frame(meta=meta, tensors=dict(tensors or {})))


def _request(batch: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    b, t = batch["input_ids"].shape
    hidden = torch.randn(b, t, 64, generator=torch.Generator().manual_seed(seed))
    return {"hidden": hidden, "attention_mask": batch["attention_mask"], "labels": batch["labels"]}


def _snapshot() -> tuple[dict[str, torch.Tensor], torch.Tensor, int, int]:
    server = server_program._SERVER["server"]  # noqa: SLF001
    return server.adapter.state_dict(), server.rng.state.clone(), len(server.pending), server.steps


def test_staged_step_then_commit_equals_the_plain_server_step(
    ctx: EnclaveContext, tiny_program: dict[str, Any], make_batch: Callable[..., dict]
) -> None:
    # Prepare: the plain-split server side, built in the same order
    torch.manual_seed(0)
    model = load_model("tiny-llama", "seq-cls", 2, seed=0).model
    _, back = slice_model(model, 2)
    method, settings = adapter_settings({"method": "lora", "rank": 4}, "adapter")
    adapter = ADAPTERS.get(method).attach(back, model, settings)
    optim = make_optim(adapter.trainable_parameters(), 0.01)
    rng = RngStream(0 + SERVER_STREAM)
    req = [_request(make_batch(seed=s), seed=s) for s in range(2)]
    # Execute
    info = _call(ctx, "init")
    first = _call(ctx, "train_step", req[0])
    second = _call(ctx, "train_step", req[1], commit=first.meta["token"])
    steps = _call(ctx, "commit", commit=second.meta["token"]).meta["steps"]
    for r in req:
        back.train()
        with rng.active():
            loss, grad = server_step(
                back, r["hidden"], r["attention_mask"], r["labels"], "seq-cls", "float32"
            )
        optim.step()
    # Assert
    assert info.meta["trainable_params"] == optim.num_params() and steps == 2
    assert second.meta["loss"] == pytest.approx(float(loss), abs=1e-6)
    torch.testing.assert_close(second.tensors["grad"], grad, atol=1e-6, rtol=0)
    exported = _call(ctx, "export_adapter").tensors
    for name, value in adapter.state_dict().items():
        torch.testing.assert_close(exported[name], value, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(hidden=r["hidden"][..., :32]), r"hidden is float32 \[4, 10, 32\]"),
        (lambda r: r.update(hidden=r["hidden"].bfloat16()), "accepted: float32"),
        (lambda r: r["hidden"].__setitem__((0, 0, 0), float("nan")), "NaN"),
        (lambda r: r.update(labels=torch.tensor([0, 1, 2, 0])), "labels are"),
        (lambda r: r.update(labels=r["labels"][:2]), "labels are"),
        (lambda r: r.update(attention_mask=r["attention_mask"] * 2), "0/1"),
        (lambda r: r.update(attention_mask=r["attention_mask"][:, :5]), "attention_mask is"),
        (lambda r: r.pop("labels"), "'labels' is missing"),
        (lambda r: r.update(extra=torch.zeros(1)), "unexpected tensors"),
    ],
)
def test_malformed_train_step_is_refused_before_any_state_changes(
    shared: EnclaveContext, make_batch: Callable[..., dict], change: Callable, message: str
) -> None:
    # Prepare: one staged step whose commit rides on the malformed request
    ctx = shared
    staged = _call(ctx, "train_step", _request(make_batch())).meta["token"]
    before = _snapshot()
    bad = _request(make_batch(seed=3))
    change(bad)
    # Execute
    with pytest.raises(ChannelError, match=message):
        _call(ctx, "train_step", bad, commit=staged)
    # Assert: adapter, RNG stream, staged steps and step count are untouched
    after = _snapshot()
    for name, value in before[0].items():
        assert torch.equal(after[0][name], value)
    assert torch.equal(after[1], before[1]) and after[2:] == before[2:]
    _call(ctx, "commit", commit=staged)  # the staged step is still there


def test_commit_tokens_are_single_use_and_unknown_ones_change_nothing(
    shared: EnclaveContext, make_batch: Callable[..., dict]
) -> None:
    ctx = shared
    token = _call(ctx, "train_step", _request(make_batch())).meta["token"]
    steps = _call(ctx, "commit", commit=token).meta["steps"]
    assert steps == _call(ctx, "commit").meta["steps"]  # no token: nothing to apply
    before = _snapshot()
    with pytest.raises(ChannelError, match="unknown step token"):
        _call(ctx, "commit", commit=token)
    with pytest.raises(ChannelError, match="unknown step token"):
        _call(ctx, "train_step", _request(make_batch()), commit="ab" * 16)
    with pytest.raises(ChannelError, match="unknown metadata"):
        _call(ctx, "eval_step", {}, step=3)
    assert _snapshot()[2:] == before[2:]


def test_grad_only_and_eval_change_nothing(
    shared: EnclaveContext, make_batch: Callable[..., dict]
) -> None:
    ctx = shared
    before = _snapshot()
    req = _request(make_batch())
    out = _call(ctx, "grad_only", req)
    logits = _call(ctx, "eval_step", {k: req[k] for k in ("hidden", "attention_mask")})
    server = server_program._SERVER["server"]  # noqa: SLF001
    assert out.tensors["grad"].shape == (4, 10, 64) and out.meta["loss"] > 0
    assert logits.tensors["logits"].shape == (4, 2)
    assert all(p.grad is None for p in server.optim.params)
    after = _snapshot()
    assert torch.equal(after[1], before[1]) and after[2:] == before[2:]


def test_calls_before_init_and_export_when_not_allowed_are_refused(
    ctx: EnclaveContext, make_batch: Callable[..., dict]
) -> None:
    with pytest.raises(EnclaveError, match="call 'init' first"):
        _call(ctx, "train_step", _request(make_batch()))
    ctx.config["allow_export"] = False
    _call(ctx, "init")
    with pytest.raises(EnclaveError, match="allow_export false"):
        _call(ctx, "export_adapter")


def test_checkpoint_then_restore_resumes_adapter_optimiser_and_steps(
    ctx: EnclaveContext, tiny_program: dict[str, Any], make_batch: Callable[..., dict]
) -> None:
    # Prepare: two committed steps, then a checkpoint into enclave state
    _call(ctx, "init")
    token = _call(ctx, "train_step", _request(make_batch())).meta["token"]
    token = _call(ctx, "train_step", _request(make_batch(seed=1)), commit=token).meta["token"]
    _call(ctx, "checkpoint", commit=token)
    saved = dict(ctx.state)
    nxt = _request(make_batch(seed=2))
    expected = _call(ctx, "train_step", nxt).tensors["grad"]
    # Execute: a fresh program instance (a restarted enclave) with the state unsealed into it
    server_program._SERVER.clear()  # noqa: SLF001
    info = _call(ctx, "init")
    restored = server_program._SERVER["server"]  # noqa: SLF001
    # Assert: same adapter, same AdamW moments, same step count; the next step agrees
    assert info.meta["restored"] is True and info.meta["steps"] == 2
    assert set(saved) == set(ctx.state)
    state = restored.optim.opt.state[restored.optim.params[0]]
    assert float(state["step"]) == 2.0
    got = _call(ctx, "train_step", nxt).tensors["grad"]
    assert not torch.equal(got, torch.zeros_like(got))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_bfloat16_wire_halves_the_traffic_and_stays_close(
    tiny_program: dict[str, Any], make_batch: Callable[..., dict]
) -> None:
    # Prepare: the same request as float32 and as bfloat16 on the wire
    kept = server_program._SERVER.pop("server", None)  # noqa: SLF001
    req = _request(make_batch())
    grads = {}
    try:
        for wire in ("float32", "bfloat16"):
            server_program._SERVER.clear()  # noqa: SLF001
            ctx = _context({**tiny_program, "wire_dtype": wire})
            _call(ctx, "init")
            sent = {
                **req,
                "hidden": req["hidden"].to(torch.bfloat16 if wire != "float32" else torch.float32),
            }
            grads[wire] = _call(ctx, "train_step", sent).tensors["grad"]
            if wire == "bfloat16":
                with pytest.raises(ChannelError, match="accepted: bfloat16"):
                    _call(ctx, "train_step", req)  # float32 where bfloat16 is configured
    finally:
        server_program._SERVER.clear()  # noqa: SLF001
        if kept is not None:
            server_program._SERVER["server"] = kept  # noqa: SLF001
    # Assert
    assert grads["bfloat16"].dtype == torch.bfloat16
    assert grads["bfloat16"].element_size() * 2 == grads["float32"].element_size()
    torch.testing.assert_close(grads["bfloat16"].float(), grads["float32"], atol=2e-3, rtol=5e-2)
