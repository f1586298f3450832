"""Prefix extraction by the accelerator's operator: recovered from the plain offload, chance when
shielded.

The views are what a real worker process received and saved (its ``capture`` option): the
same party's evaluation forwards once with its masks removed (the plain offload) and once
with its real one-time pads; the control feeds the attack random operands of the same shapes.
"""

from __future__ import annotations

import math

import pytest
import torch

from shieldtune.attacks import ATTACKS
from shieldtune.attacks._attention_fit import Attention, fit_prefix
from shieldtune.attacks._rebuild import offloaded_maps
from shieldtune.attacks.metrics import random_guess
from shieldtune.attacks.prefix_extraction import PrefixExtractor
from shieldtune.attacks.runner import ExtractionSuite, extraction_leakage
from shieldtune.errors import ConfigError

PREFIX = {"method": "prefix", "num_virtual_tokens": 4}


def _batches(n: int, seed: int, padded: bool = False) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of 8 × 32 byte tokens; the class is the second token; ``padded``: rows
    of 8 to 32 tokens, right-padded."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(10, 250, (8, 32), generator=gen)
        labels = torch.randint(0, 2, (8,), generator=gen)
        ids[:, 1] = 5 + labels
        mask = torch.ones_like(ids)
        if padded:
            lengths = torch.randint(8, 33, (8, 1), generator=gen)  # (8, 1)
            mask = (torch.arange(32)[None] < lengths).long()  # (8, 32)
            ids = ids * mask  # pad id 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.mark.integration
def test_prefix_is_recovered_from_the_plain_offload_and_not_from_the_shielded_one() -> None:
    # Prepare: a party trains 3 steps at a high lr (the prefix moves ~2x its initial norm),
    # then evaluates 2 batches; one more batch is held out for the prefix's effect
    suite = ExtractionSuite(
        model="tiny-llama",
        adapter=PREFIX,
        train=_batches(3, seed=0),
        evaluate=_batches(2, seed=1),
        holdout=_batches(1, seed=2),
        attacks=("prefix-extraction",),
        lr=3e-2,
        fused=False,
    )
    # Execute
    rows = extraction_leakage(suite)
    got = {(r["mode"], r["metric"]): r for r in rows}
    # Assert: five metrics per view, every layer attacked, every token row read
    assert len(rows) == len(got) == 3 * 5
    assert all(r["n"] == 4 and r["adapted"] == 4 and r["rows"] == 512 for r in rows)
    # a random guess of the right norm scores about sqrt(2), and changes the effect by as much
    # as training did; the public prefix scores 1 on both
    assert abs(got[("plain-offload", "relative_error")]["random_guess"] - math.sqrt(2)) < 0.1
    assert got[("plain-offload", "attention_error")]["random_guess"] > 0.9
    # the plain offload gives the prefix away: its effect on unseen tokens almost exactly, and
    # (training has grown the logits enough to pin them) the keys and values themselves
    plain = {metric: got[("plain-offload", metric)]["value"] for (_, metric) in got}
    assert plain["attention_error"] < 0.01
    assert plain["value_relative_error"] < 0.03 and plain["key_relative_error"] < 0.1
    assert plain["relative_error"] < 0.1 and plain["cosine"] > 0.99
    # the shielded operands, and random ones (negative control), leave it at chance: no better
    # than the public prefix on unseen tokens, and a change uncorrelated with the true one
    # (the cosine's standard deviation is about 1/sqrt(512 key entries) ≈ 0.044: 0.2 is 4.5)
    for mode in ("shielded", "random-operands"):
        assert got[(mode, "attention_error")]["value"] > 0.9, mode
        assert abs(got[(mode, "cosine")]["value"]) < 0.2, mode
        assert got[(mode, "relative_error")]["value"] > 0.98, mode


def test_the_fit_recovers_a_prefix_from_exact_attention_directions() -> None:
    # Prepare: rows of (★) with a known prefix, seen up to a random positive scale per row
    gen = torch.Generator().manual_seed(0)
    n, heads, kv_heads, p, d = 256, 4, 2, 3, 8

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    attn = Attention(randn(n, heads, d), randn(n, heads), randn(n, heads, d), d**-0.5)
    init = 0.5 * randn(2, kv_heads, p, d)
    true = init + 0.3 * randn(2, kv_heads, p, d)
    seen = attn.output(true[0], true[1]).reshape(n, -1)
    seen = seen * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    no_prior = (0.0,) * 4
    # Execute
    est = fit_prefix(attn, seen, init, rhos=no_prior, iters=600)
    # Assert: recovered; and with an unchanged prefix in the data, nothing is invented
    torch.testing.assert_close(est, true, rtol=0, atol=1e-5)
    unchanged = attn.output(init[0], init[1]).reshape(n, -1)
    same = fit_prefix(attn, unchanged, init, rhos=no_prior, iters=600)
    torch.testing.assert_close(same, init, rtol=0, atol=1e-6)


def _hooked_passes(
    attack: PrefixExtractor, state: dict[str, torch.Tensor], batches: list[dict]
) -> list[dict[int, torch.Tensor]]:
    """The operands of every offloaded map while the attacker's float model runs ``batches``
    under ``state``, each row times a random positive scale (the accelerator's view of clear
    inputs: fixed point scales every row by its own unknown factor)."""
    party, gen = attack.party, torch.Generator().manual_seed(3)
    maps = {i: party.whole.get_submodule(name) for name, (i, _) in offloaded_maps(party).items()}
    passes: list[dict[int, torch.Tensor]] = []

    def save(map_id: int, operand: torch.Tensor) -> None:
        rows = operand.flatten(0, -2).double()  # (B·T, d_in)
        passes[-1][map_id] = rows * (0.1 + torch.rand(rows.shape[0], 1, generator=gen))

    hooks = [m.register_forward_hook(lambda _m, a, _y, i=i: save(i, a[0])) for i, m in maps.items()]
    initial = party.adapter.state_dict()
    party.adapter.load_state_dict(state)
    for batch in batches:
        passes.append({})
        party.logits(batch)
    for hook in hooks:
        hook.remove()
    party.adapter.load_state_dict(initial)
    return passes


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_each_family_gives_the_prefix_effect_away_from_clear_operands(model: str) -> None:
    # Prepare: the attacker's own rebuild with a moved prefix, run on batches with right
    # padding (the masks matter); no fixed point, so only the norms' ε separates (★) from the
    # operands. A little-trained prefix on a tiny random model has small logits, so only its
    # effect is determined (module docstring), and that is what is asserted
    attack = ATTACKS.get("prefix-extraction").build(model, PREFIX, w_bits=None, iters=200)
    moved = attack.party.adapter.state_dict()
    gen = torch.Generator().manual_seed(0)
    key = "prefix.embedding.weight"
    moved[key] = moved[key] + 0.05 * torch.randn(moved[key].shape, generator=gen)
    batches = _batches(2, seed=1, padded=True)
    passes = _hooked_passes(attack, moved, batches)
    guess = random_guess(attack.deltas(moved), gen)
    # Execute
    est = attack(passes, [b["attention_mask"] for b in batches])
    scores = attack.scores(est, guess, moved, _batches(1, seed=2, padded=True))
    # Assert: the effect on unseen tokens within 1 % of what the move changed; a guess of the
    # right size is no better than the public prefix
    effect = next(r for r in scores if r["metric"] == "attention_error")
    assert effect["value"] < 0.01, scores
    assert effect["random_guess"] > 0.9, scores


def test_other_adapters_and_wrong_layouts_are_refused() -> None:
    # Prepare
    entry = ATTACKS.get("prefix-extraction")
    attack = entry.build("tiny-llama", PREFIX)
    passes = [{0: torch.zeros(8 * 32, 64)}]
    # Execute / Assert: LoRA is lora-extraction's; each pass needs its batch layout
    assert entry.surface == "accelerator"
    with pytest.raises(ConfigError, match="'lora' is not attacked.*'prefix' only"):
        entry.build("tiny-llama", {"method": "lora", "rank": 4})
    with pytest.raises(ValueError, match="padding mask: 1 passes, masks: none"):
        attack(passes)
    with pytest.raises(ValueError, match=r"pass 0 has \[256\] operand rows.*lays out 128"):
        attack(passes, [torch.ones(4, 32)])
