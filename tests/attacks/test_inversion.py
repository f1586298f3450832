"""Hidden-state inversion: it reads plain-split activations, and reads nothing from ciphertext."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shieldtune.attacks import ATTACKS
from shieldtune.attacks.capture import plain_split_view
from shieldtune.attacks.metrics import blind_guess, token_recovery
from shieldtune.attacks.runner import InversionSuite, leakage_vs_cut
from shieldtune.data.tables import Dataset
from shieldtune.data.tasks import batches, encode_classification
from shieldtune.errors import ConfigError
from shieldtune.models import load_model, slice_model

pytestmark = pytest.mark.integration

MAX_LENGTH = 64


def _setup(name: str, cut: int, public_text: Dataset, victim_text: Dataset):
    loaded = load_model(name, "seq-cls", victim_text.num_labels, seed=0)
    public = encode_classification(public_text, loaded.tokenizer, MAX_LENGTH)
    victim = list(
        batches(encode_classification(victim_text, loaded.tokenizer, MAX_LENGTH), 4, False)
    )
    front, _ = slice_model(loaded.model, cut)
    for p in front.parameters():
        p.requires_grad_(False)
    return front, public, victim


def _recovery(attack, views, victim) -> tuple[float, float]:
    """(recovery, blind-guess chance) over all real positions of the victim batches."""
    pred = torch.cat([attack(h).flatten() for h in views])
    target = torch.cat([b["input_ids"].flatten() for b in victim])
    real = torch.cat([b["attention_mask"].flatten().bool() for b in victim])
    guess = torch.full_like(target, blind_guess(target, real))
    return token_recovery(pred, target, real), token_recovery(guess, target, real)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
@pytest.mark.parametrize("cut", [0, 2])
def test_nearest_neighbour_recovers_plain_split_text(
    name: str, cut: int, public_text: Dataset, victim_text: Dataset
) -> None:
    # Prepare: what a plain-split server receives
    front, public, victim = _setup(name, cut, public_text, victim_text)
    views = plain_split_view(front, victim, seed=0)
    # Execute
    attack = ATTACKS.get("nn-inversion").build(front, public, seed=0)
    recovery, chance = _recovery(attack, views, victim)
    # Assert: most bytes of unseen text come back (the blind guess gets about 15 %)
    assert recovery > 0.9, (recovery, chance)
    assert chance < 0.25


def test_learned_inversion_recovers_plain_split_text_and_not_random_states(
    public_text: Dataset, victim_text: Dataset
) -> None:
    # Prepare
    front, public, victim = _setup("tiny-llama", 2, public_text, victim_text)
    views = plain_split_view(front, victim, seed=0)
    gen = torch.Generator().manual_seed(0)
    noise = [torch.randn(h.shape, generator=gen) * h.std() for h in views]
    # Execute
    learned = ATTACKS.get("learned-inversion").build(front, public, seed=0)
    nearest = ATTACKS.get("nn-inversion").build(front, public, seed=0)
    # Assert: the learned model reads real activations ...
    recovery, chance = _recovery(learned, views, victim)
    assert recovery > 0.8, (recovery, chance)
    # ... and neither attack reads anything from random states of the same scale
    for attack in (learned, nearest):
        on_noise, chance = _recovery(attack, noise, victim)
        assert on_noise <= chance + 0.05, (on_noise, chance)


def test_leakage_vs_cut_plain_split_versus_the_sealed_wire(
    public_text: Dataset, victim_text: Dataset, tmp_path: Path
) -> None:
    # Prepare: a real split-server enclave behind the gRPC relay, tapped at the host
    suite = InversionSuite(
        model="tiny-llama",
        victim=victim_text,
        public=public_text,
        cuts=[1],
        attacks=["nn-inversion", "learned-inversion", "prior-guess"],
        max_length=MAX_LENGTH,
        platform_key=tmp_path / "sim_platform_key",
    )
    # Execute
    rows = leakage_vs_cut(suite)
    got = {(r["attack"], r["mode"], r["metric"]): r for r in rows}
    # Assert: one row per (attack, mode, metric), every field filled
    assert len(rows) == len(got) == 3 * 2 * 2
    assert all(r["cut"] == 1 and r["n"] > 400 and 0 <= r["chance"] < 1 for r in rows)
    for attack in ("nn-inversion", "learned-inversion"):
        plain = got[(attack, "plain-split", "token_recovery")]
        sealed = got[(attack, "split", "token_recovery")]
        # plain-split leaks the text; the sealed wire leaks nothing beyond chance
        assert plain["value"] > 0.8 and plain["value"] > plain["chance"] + 0.5
        assert sealed["value"] <= sealed["chance"] + 0.03, sealed
        rouge = got[(attack, "split", "rouge_l")]
        assert rouge["value"] <= rouge["chance"] + 0.05, rouge
    # the null attack scores chance in both modes: the chance column is what it says
    for mode in ("plain-split", "split"):
        null = got[("prior-guess", mode, "token_recovery")]
        assert null["value"] <= null["chance"] + 1e-9


def test_unknown_or_misplaced_attacks_are_refused(
    public_text: Dataset, victim_text: Dataset
) -> None:
    base = {"model": "tiny-llama", "victim": victim_text, "public": public_text, "cuts": [0]}
    with pytest.raises(ConfigError, match="unknown attack 'magic'.*accepted: learned-inversion"):
        leakage_vs_cut(InversionSuite(**base, attacks=["magic"]))
    with pytest.raises(ConfigError, match=r"\['mia-loss'\] do not read 'cut-activations'"):
        leakage_vs_cut(InversionSuite(**base, attacks=["mia-loss"]))
    with pytest.raises(ConfigError, match="modes: unknown.*accepted: plain-split, split"):
        leakage_vs_cut(InversionSuite(**base, modes=["shielded"]))
