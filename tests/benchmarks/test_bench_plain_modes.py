"""benchmarks/bench_plain_modes.py: per-model defaults, and one timed mode on a tiny model."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_plain_modes.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_plain_modes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(**kw) -> argparse.Namespace:
    base = {"model": "minilm", "task": None, "batch": None, "seq": None}
    return argparse.Namespace(**{**base, **kw})


def test_smollm2_defaults_to_causal_lm_8x128(bench) -> None:
    args = bench.resolve_defaults(_args(model="smollm2"))
    assert (args.task, args.batch, args.seq) == ("causal-lm", 8, 128)


def test_encoder_defaults_and_explicit_values_win(bench) -> None:
    assert vars(bench.resolve_defaults(_args())) == {
        "model": "minilm",
        "task": "seq-cls",
        "batch": 16,
        "seq": 128,
    }
    args = bench.resolve_defaults(_args(model="smollm2", task="seq-cls", batch=2, seq=16))
    assert (args.task, args.batch, args.seq) == ("seq-cls", 2, 16)


@pytest.mark.parametrize("mode", ["local-lora", "plain-split-spf1%+lora"])
def test_one_mode_reports_time_memory_and_trainable(bench, mode: str) -> None:
    # Prepare: a causal LM built in code, one warm-up and two timed steps
    args = argparse.Namespace(
        model="tiny-llama",
        task="causal-lm",
        batch=2,
        seq=16,
        cut=2,
        steps=2,
        warmup=1,
        precision="float32",
        device="cpu",
        mode=mode,
    )
    # Execute
    row = bench.run_one(args)
    # Assert
    assert row["mode"] == mode and row["device"] == "cpu"
    assert 0 < row["step_s"] <= row["median_s"]
    assert row["peak_mb"] > 0 and row["trainable"] > 0
