"""LoRA extraction by the accelerator's operator: exact on the plain offload, chance when shielded.

The views are what a real worker process received and saved (its ``capture`` option): the
same party's evaluation forwards once with its masks removed (the plain offload) and once
with its real one-time pads.
"""

from __future__ import annotations

import math

import pytest
import torch

from shieldtune.attacks import ATTACKS, SURFACES
from shieldtune.attacks.adapter_extraction import solve_low_rank
from shieldtune.attacks.capture import accelerator_passes
from shieldtune.attacks.runner import ExtractionSuite, extraction_leakage
from shieldtune.errors import ConfigError

pytestmark = pytest.mark.integration


def _batches(n: int, task: str, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of 8 × 32 byte tokens; seq-cls: the class is the second token."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(10, 250, (8, 32), generator=gen)
        if task == "seq-cls":
            labels = torch.randint(0, 2, (8,), generator=gen)
            ids[:, 1] = 5 + labels
        else:
            labels = ids.clone()
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


@pytest.mark.parametrize(
    ("model", "task", "targets", "attacked"),
    [
        # pre-norm, RMSNorm; causal-lm: the last down_proj is read through the LM head's input
        ("tiny-llama", "causal-lm", ["o_proj", "down_proj"], 8),
        # post-norm, LayerNorm; seq-cls: the last output.dense feeds only the [CLS] pooler
        ("tiny-bert", "seq-cls", ["output.dense"], 7),
    ],
)
def test_lora_is_recovered_from_the_plain_offload_and_not_from_the_shielded_one(
    model: str, task: str, targets: list[str], attacked: int
) -> None:
    # Prepare: a party trains 3 steps (B != 0, A moved off its seed), then evaluates 2 batches
    suite = ExtractionSuite(
        model=model,
        adapter={"method": "lora", "rank": 4, "target_modules": targets},
        train=_batches(3, task, seed=0),
        evaluate=_batches(2, task, seed=1),
        task=task,
        num_labels=2 if task == "seq-cls" else None,
        lr=3e-3,
        fused=False,
    )
    # Execute
    rows = extraction_leakage(suite)
    got = {(r["mode"], r["metric"]): r for r in rows}
    # Assert: one row per (view, metric), all 8 adapted maps counted
    assert len(rows) == len(got) == 3 * 2
    assert all(r["n"] == attacked and r["adapted"] == 8 and r["rows"] == 512 for r in rows)
    # a random guess of the right rank and norm scores about sqrt(2), the zero guess 1
    guess = got[("plain-offload", "relative_error")]["random_guess"]
    assert abs(guess - math.sqrt(2)) < 0.1
    # the plain offload gives the adapter away
    assert got[("plain-offload", "relative_error")]["value"] < 0.1
    assert got[("plain-offload", "cosine")]["value"] > 0.99
    # the shielded operands, and random ones (negative control), leave the attack at chance.
    # Independent of the adapter, the cosine has a standard deviation of about
    # 1/sqrt(sum of out·r over the maps) = 1/sqrt(7 · 64 · 4) ≈ 0.024; 0.1 is four of them,
    # and |cos| < 0.1 forces a relative error >= sqrt(1 - 0.1²) ≈ 0.995 whatever the norm.
    for mode in ("shielded", "random-operands"):
        assert abs(got[(mode, "cosine")]["value"]) < 0.1, mode
        assert got[(mode, "relative_error")]["value"] > 0.99, mode


def test_the_solver_is_exact_on_an_exact_relation() -> None:
    # Prepare: (W + s·B·A) u_n = F_n λ_n exactly, A moved away from its public seed A0
    gen = torch.Generator().manual_seed(0)
    n, d_in, d_out, k, r, s = 400, 24, 16, 3, 2, 2.0

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    weight, a0, b = randn(d_out, d_in), randn(r, d_in), randn(d_out, r)
    a = a0 + 0.3 * randn(r, d_in)
    delta = s * b @ a
    u = randn(n, d_in) * torch.rand(n, 1, generator=gen, dtype=torch.float64)  # any row scale
    basis = randn(n, d_out, k - 1)
    seen = u @ (weight + delta).T  # (n, out): put it in each row's span, with a random weight
    basis = torch.cat([basis, (seen * randn(n, 1))[..., None]], dim=-1)
    # Execute
    est = solve_low_rank(u, basis, weight, a0, s)
    # Assert: recovered; and with no adapter in the relation, nothing is invented
    torch.testing.assert_close(est, delta, rtol=1e-6, atol=1e-6 * float(delta.abs().max()))
    basis[..., -1] = u @ weight.T
    assert float(solve_low_rank(u, basis, weight, a0, s).norm()) < 1e-8 * float(delta.norm())


def test_captured_operands_are_grouped_into_passes_as_the_worker_sees_them() -> None:
    # Prepare: a training pass (map 0 in two chunks, then backward) and an evaluation pass
    p = 101
    op = torch.tensor([[1, p - 1]])  # centred: [1, -1]
    records = [
        ("forward:0", op),
        ("forward:0", op + 1),
        ("forward:1", op),
        ("backward:1", op),
        ("forward:0", op),
        ("forward:1", op),
        ("forward:0", op),  # a new pass: the map id went down
    ]
    # Execute
    passes = accelerator_passes(records, p)
    # Assert
    assert [ps.training for ps in passes] == [True, False, False]
    assert passes[0].operands[0].tolist() == [[1.0, -1.0], [2.0, 0.0]]
    assert sorted(passes[1].operands) == [0, 1] and list(passes[2].operands) == [0]


def test_adapters_without_an_exact_relation_are_refused() -> None:
    entry = ATTACKS.get("lora-extraction")
    assert entry.surface == "accelerator" and "accelerator" in SURFACES
    # PEFT's default LLaMA targets (q_proj, v_proj): mixed by attention before any operand
    with pytest.raises(ConfigError, match="no adapted map.*attackable targets"):
        entry.build("tiny-llama", {"method": "lora", "rank": 4})
    with pytest.raises(ConfigError, match="'prefix' is not attacked"):
        entry.build("tiny-llama", {"method": "prefix", "num_virtual_tokens": 4})
