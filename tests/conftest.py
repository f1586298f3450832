"""Shared fixtures: tiny models built in code, padded batches, the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# (preset, task) pairs every tiny family supports
TINY_CASES = [
    ("tiny-llama", "causal-lm"),
    ("tiny-llama", "seq-cls"),
    ("tiny-qwen2", "causal-lm"),
    ("tiny-qwen2", "seq-cls"),
    ("tiny-gpt2", "causal-lm"),
    ("tiny-gpt2", "seq-cls"),
    ("tiny-bert", "seq-cls"),
]


def padded_batch(batch: int = 3, seq: int = 12, vocab: tuple[int, int] = (4, 200), seed: int = 0):
    """Random token ids with right padding of different lengths in each row (pad id 0)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab[0], vocab[1], (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        mask[row, seq - 3 * row :] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.fixture
def batch():
    return padded_batch()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    folder = Path(os.environ.get("SHIELDTUNE_DATA_DIR", SHARED / "data"))
    if not folder.is_dir():
        pytest.skip(f"shared medical data not found at {folder}")
    return folder


@pytest.fixture(scope="session")
def attestation_dir() -> Path:
    """The genuine SGX / TDX / SEV-SNP evidence; skips when it is not on this machine."""
    env = os.environ.get("SHIELDTUNE_ATTESTATION_DIR")
    path = Path(env) if env else SHARED / "attestation"
    if not (path / "dcap" / "sgx_quote").is_file():
        pytest.skip(
            f"genuine attestation vectors not found at {path} "
            "(set SHIELDTUNE_ATTESTATION_DIR to the shared/attestation folder)"
        )
    return path
