"""Membership inference from a visible update: it works on plain FedAvg, DP blunts it, sealing
leaves chance."""

from __future__ import annotations

from statistics import mean
from typing import Any

import pytest
import torch

from shieldtune.attacks import ATTACKS, privatize
from shieldtune.attacks._shadow import Shadow
from shieldtune.attacks.capture import sealed_update_record, sealed_update_view
from shieldtune.attacks.metrics import roc_auc
from shieldtune.attacks.runner import MembershipSuite, update_leakage
from shieldtune.attacks.views import read_record, specs_of
from shieldtune.config import TrainConfig, adapter_settings
from shieldtune.crypto.framing import encode_frame
from shieldtune.errors import ConfigError
from shieldtune.federated.client_app import AdapterTrainer, LocalTraining
from shieldtune.training import task_loss

from .conftest import random_sequences

pytestmark = pytest.mark.integration

ATTACK_NAMES = ("mia-loss", "mia-gradient")
N = 32  # members; as many non-members


def _settings(method: str, options: dict[str, Any]) -> LocalTraining:
    """A client fine-tuning tiny-llama as a causal LM for 4 epochs (one FedAvg round)."""
    _, adapter = adapter_settings({"method": method, **options}, "adapter")
    train = TrainConfig(lr=1e-2, batch_size=8, schedule="constant", warmup_ratio=0.0)
    return LocalTraining(
        model="tiny-llama",
        task="causal-lm",
        num_labels=None,
        method=method,
        settings=adapter,
        epochs=4,
        batch_size=8,
        eval_batch_size=32,
        lr=1e-2,
        train_cfg=train,
        seed=0,
    )


@pytest.fixture(scope="module")
def lora_round() -> dict[str, Any]:
    """One client's LoRA round, the host's shadow and the attacks built on 2·N candidates."""
    settings = _settings("lora", {"rank": 4})
    members, others = random_sequences(N, seed=1), random_sequences(N, seed=2)
    client = AdapterTrainer(settings, members, members, partition=0)
    start = client.state()
    update, _, _ = client.fit({}, {"server-round": 1})
    shadow = Shadow(settings)
    candidates = {k: torch.cat([members[k], others[k]]) for k in members}
    scorers = {n: ATTACKS.get(n).build(shadow, start, candidates) for n in ATTACK_NAMES}
    return {
        "start": start,
        "update": update,
        "scorers": scorers,
        "member": torch.arange(2 * N) < N,
    }


def test_plain_update_reveals_members(lora_round: dict[str, Any]) -> None:
    for name, scorer in lora_round["scorers"].items():
        auc = roc_auc(scorer(lora_round["update"]), lora_round["member"])
        assert auc > 0.85, (name, auc)
    # control: the update of a client that did not train reveals nothing
    for name, scorer in lora_round["scorers"].items():
        untrained = roc_auc(scorer(lora_round["start"]), lora_round["member"])
        assert abs(untrained - 0.5) < 0.2, (name, untrained)


def test_dp_noise_pulls_membership_auc_towards_chance(lora_round: dict[str, Any]) -> None:
    # Prepare: the update norm is about 3; clip at 1 and vary the noise multiplier
    gen = torch.Generator().manual_seed(0)
    start, update, member = lora_round["start"], lora_round["update"], lora_round["member"]
    for name, scorer in lora_round["scorers"].items():
        plain = roc_auc(scorer(update), member)
        # Execute: mean AUC over 4 noise draws per setting
        weak = mean(
            roc_auc(scorer(privatize(update, start, 1.0, 0.01, gen)), member) for _ in range(4)
        )
        strong = mean(
            roc_auc(scorer(privatize(update, start, 1.0, 1.0, gen)), member) for _ in range(4)
        )
        # Assert: little noise keeps most of the leak, σ = 1 leaves about chance
        assert weak > 0.8, (name, weak)
        assert abs(strong - 0.5) < 0.12 and strong < plain - 0.3, (name, plain, strong)


def test_sealed_update_leaves_membership_at_chance(lora_round: dict[str, Any]) -> None:
    start, update, member = lora_round["start"], lora_round["update"], lora_round["member"]
    for name, scorer in lora_round["scorers"].items():
        # the host's reading of 6 independently sealed submit records
        aucs = [
            roc_auc(scorer(sealed_update_view(sealed_update_record(update, N), start)), member)
            for _ in range(6)
        ]
        assert abs(mean(aucs) - 0.5) < 0.1, (name, aucs)
        # control: the same reading of the *unsealed* frame is the update, and leaks
        frame = encode_frame({"ecall": "submit"}, update)
        read = read_record(frame, specs_of(update), sealed=False)
        assert roc_auc(scorer(read), member) == roc_auc(scorer(update), member)


def test_runner_rows_for_an_spf_delta() -> None:
    # Prepare: the client fine-tunes a 5 % SPF delta (its update is indices + values + head)
    suite = MembershipSuite(
        settings=_settings("spf", {"density": 0.05, "saliency": "magnitude"}),
        members=random_sequences(N, seed=3),
        nonmembers=random_sequences(N, seed=4),
        dp=[(1.0, 1.0)],
        repeats=3,
    )
    # Execute
    rows = update_leakage(suite)
    got = {(r["attack"], r["mode"], r["defence"], r["metric"]): r for r in rows}
    # Assert: 2 attacks × 3 views × 2 metrics, and the expected shape
    assert len(rows) == len(got) == 12
    assert all(r["cut"] is None and r["n"] == 2 * N for r in rows)
    assert {
        r["repeats"] for r in rows if r["defence"] != "none" or r["mode"] != "plain-fedavg"
    } == {3}
    for name in ATTACK_NAMES:
        plain = got[(name, "plain-fedavg", "none", "auc")]
        noisy = got[(name, "plain-fedavg", "dp(clip=1, sigma=1)", "auc")]
        sealed = got[(name, "secure-fedavg", "none", "auc")]
        assert plain["value"] > 0.9 and plain["chance"] == 0.5
        assert noisy["value"] < plain["value"] - 0.2
        assert abs(sealed["value"] - 0.5) < 0.15  # mean of 3 seals: chance up to sampling noise
        adv = got[(name, "plain-fedavg", "none", "advantage")]
        assert adv["value"] > adv["chance"] + 0.4


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_shadow_losses_are_the_clients_task_loss_per_example(task: str) -> None:
    settings = _settings("lora", {"rank": 4})
    if task == "seq-cls":
        settings = LocalTraining(**{**settings.__dict__, "task": task, "num_labels": 3})
    shadow = Shadow(settings)
    batch = random_sequences(5, seed=7)
    batch["labels"][1, :4] = -100  # a prompt whose loss is not taken
    if task == "seq-cls":
        batch["labels"] = torch.tensor([0, 2, 1, 1, 0])
    shadow.load(shadow.initial_state())
    with torch.no_grad():
        single = [
            task_loss(
                shadow.client.whole(
                    batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1]
                ),
                batch["labels"][i : i + 1],
                task,
            )
            for i in range(5)
        ]
    torch.testing.assert_close(shadow.losses(batch), torch.stack(single).double())


def test_membership_suite_refusals() -> None:
    members = random_sequences(4, seed=5)
    base = {"settings": _settings("lora", {"rank": 4}), "members": members, "nonmembers": members}
    with pytest.raises(ConfigError, match="unknown attack 'nn-magic'"):
        update_leakage(MembershipSuite(**base, attacks=["nn-magic"]))
    with pytest.raises(ConfigError, match=r"\['nn-inversion'\] do not read 'update'"):
        update_leakage(MembershipSuite(**base, attacks=["nn-inversion"]))
    with pytest.raises(ConfigError, match="modes: unknown.*accepted: plain-fedavg, secure-fedavg"):
        update_leakage(MembershipSuite(**base, modes=["split"]))
    with pytest.raises(ConfigError, match="repeats: 0 must be >= 1"):
        update_leakage(MembershipSuite(**base, repeats=0))
