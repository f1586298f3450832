"""Method 1 test helpers (import as ``from _shielded import make_party``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from shieldtune.shielded.program import ShieldedParty

TRAIN = SimpleNamespace(weight_decay=0.0, grad_clip=1.0, schedule="constant", warmup_ratio=0.0)


def make_party(model: str = "tiny-llama", task: str = "seq-cls", **overrides: Any) -> ShieldedParty:
    """A party in this process (its offload still goes to a real worker process)."""
    kwargs: dict[str, Any] = dict(
        model=model,
        task=task,
        num_labels=2 if task == "seq-cls" else None,
        adapter={"method": "lora", "rank": 4},
        lr=3e-3,
        train=TRAIN,
        seed=0,
        total_steps=50,
        offload=True,
        w_bits=12,
        field_bits=0,
        max_bits=0,
        check_rate=1.0,
        pool_size=1,
        rows=64,
    )
    kwargs.update(overrides)
    return ShieldedParty(**kwargs)
