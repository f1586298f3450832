"""How far Method 1's fixed-point training drifts from float32, by weight and operand bits.

    PYTHONPATH=src python benchmarks/shielded_encoding_error.py [--models tiny-llama,minilm
        --steps 20 --w-bits 8,10,12,16 --max-bits 0,16,12]

For each model and encoding, two parties train LoRA (r = 4) on the same 20 batches of a
learnable keyword task (the class is the first word): one in float32 (``offload: false``),
one in exact fixed point. The fixed-point party computes its products in the clear
(:class:`~shieldtune.shielded.engine.ClearFixedPoint`), which the masked offload equals bit for
bit (tests/shielded/test_offload.py), so no worker is needed here. Printed: the relative loss
difference after the last step, the largest over all steps, and the field the encoding used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from shieldtune.shielded.program import ShieldedParty  # noqa: E402

TRAIN = SimpleNamespace(weight_decay=0.0, grad_clip=1.0, schedule="constant", warmup_ratio=0.0)


def batches(vocab: int, n: int, batch: int = 8, seq: int = 32) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(10, min(vocab, 2000), (batch, seq), generator=gen)
        labels = torch.randint(0, 2, (batch,), generator=gen)
        ids[:, 1] = 5 + labels  # the class is the first word
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def party(model: str, **kw) -> ShieldedParty:  # noqa: ANN003
    return ShieldedParty(
        model=model, task="seq-cls", num_labels=2, adapter={"method": "lora", "rank": 4},
        lr=1e-3, train=TRAIN, seed=0, total_steps=100, check_rate=1.0, pool_size=0, rows=256,
        field_bits=0, **kw,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny-llama,minilm")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--w-bits", default="8,10,12,16")
    ap.add_argument("--max-bits", default="0")
    args = ap.parse_args()
    print(
        f"{'model':<12}{'w_bits':>7}{'max_bits':>9}{'p bits':>7}{'op bits':>8}"
        f"{'rel diff last':>15}{'rel diff max':>14}"
    )
    for model in args.models.split(","):
        plain = party(model, offload=False, w_bits=8, max_bits=0)
        data = batches(plain.whole.config.vocab_size, args.steps)
        want = [plain.train_step(b) for b in data]
        for w_bits in [int(v) for v in args.w_bits.split(",")]:
            for max_bits in [int(v) for v in args.max_bits.split(",")]:
                fx = party(
                    model, offload=True, w_bits=w_bits, max_bits=max_bits, clear_reference=True
                )
                got = [fx.train_step(b) for b in data]
                rel = [abs(g - w) / abs(w) for g, w in zip(got, want, strict=True)]
                print(
                    f"{model:<12}{w_bits:>7}{max_bits:>9}{fx.field.bits:>7}"
                    f"{fx.info['fwd_bits_min']:>8}{rel[-1]:>15.2e}{max(rel):>14.2e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
