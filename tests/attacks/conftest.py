"""Attack fixtures: one thread for tiny models, generated text, random token sequences."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from shieldtune.data.builtin import generate_medical_sample
from shieldtune.data.tables import Dataset


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, and leave the second core to others."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def public_text() -> Dataset:
    """The attacker's public text: generated abstracts (seed 1)."""
    return generate_medical_sample(60, seed=1)


@pytest.fixture(scope="session")
def victim_text() -> Dataset:
    """The client's private text: other generated abstracts (seed 2), never seen by the attacker."""
    return generate_medical_sample(8, seed=2)


def random_sequences(n: int, seed: int, length: int = 16) -> dict[str, torch.Tensor]:
    """``n`` random byte-token sequences as causal-LM examples (labels = the tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 200, (n, length), generator=gen)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(n, length, dtype=torch.long),
        "labels": ids.clone(),
    }
