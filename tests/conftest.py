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

from _tiny import padded_batch, write_keyword_table  # noqa: E402


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


@pytest.fixture(scope="session")
def keyword_table(tmp_path_factory) -> Path:
    """A learnable two-class table (96 rows), shared by the recipe tests."""
    return write_keyword_table(tmp_path_factory.mktemp("data") / "kw.csv")


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory, keyword_table):
    """The 2-row × 2-seed tiny-llama experiment of ``_experiment.py``, run once (CLI)."""
    from _experiment import run_tiny_experiment

    return run_tiny_experiment(tmp_path_factory.mktemp("experiment"), keyword_table)
