"""Cost of Method 1 (TEE-shielded LoRA with exact masked offload), measured in one run.

    PYTHONPATH=src python benchmarks/bench_shielded.py [--model minilm --batch 16 --seq 128
        --steps 6 --device auto --gemm auto]

Three parties train the same model and batches, each in its own (SIMULATED) enclave process
behind the attested channel, steps alternating so background load hits all alike:

- plain:     the float32 LoRA step with nothing offloaded (``offload: false``). On a CPU-only
             machine this is also the TEE-only step (the whole step inside the enclave).
- shielded:  every frozen linear map offloaded to the accelerator worker (its own process; CUDA
             when ``--device`` resolves to it) on one-time-padded operands, Freivalds on every
             product. *Online* step = the train_step ECALL with the pool of factors full;
             the *offline* precompute (refilling the pool) is timed apart, per step.

Printed: median step times and the ratio shielded ÷ plain; offline seconds per step; the
backend the accelerator's probe chose (and its timings); the online time split (take a factor
from the pool, encode+mask, transfer, worker products, Freivalds, unmask+decode, enclave-side
ops = the rest) over the timed steps; with ``--eager`` the same for a party whose elementwise
passes are not fused (``shielded.fused: false``); bytes to and from
the accelerator per step; peak RSS of each enclave process. On a GPU machine also
shielded ÷ TEE-only (Slalom's metric) and shielded ÷ plain GPU step.

The enclave is a simulation (no hardware protection): the figures are the cost of the software
path, not of SGX/TDX memory encryption.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from shieldtune.config import load_config  # noqa: E402
from shieldtune.experiments.provenance import cpu_name  # noqa: E402
from shieldtune.models import load_model  # noqa: E402
from shieldtune.recipes.shielded import open_party, party_config  # noqa: E402
from shieldtune.tee.backends.simulated import PLATFORM_KEY_ENV  # noqa: E402


def _batches(args: argparse.Namespace, vocab: int, n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (args.batch, args.seq), generator=gen)
        mask = torch.ones_like(ids)
        labels = (
            torch.randint(0, 5, (args.batch,), generator=gen)
            if args.task == "seq-cls"
            else ids.clone()
        )
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--task", default="seq-cls")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--gemm", default="auto")
    ap.add_argument("--w-bits", type=int, default=12)
    ap.add_argument("--check-rate", type=float, default=1.0)
    ap.add_argument(
        "--eager",
        action="store_true",
        help="also a shielded party with the elementwise passes unfused (shielded.fused false)",
    )
    args = ap.parse_args()
    os.environ.setdefault(PLATFORM_KEY_ENV, str(Path(tempfile.mkdtemp()) / "sim_platform_key"))

    overrides = [
        f"model.name={args.model}",
        f"model.task={args.task}",
        "mode=shielded",
        f"data.max_length={args.seq}",
        "adapter={method: lora, rank: 8, alpha: 16}",
        f"train.batch_size={args.batch}",
        "train.schedule=constant",
        f"shielded.w_bits={args.w_bits}",
        f"shielded.check_rate={args.check_rate}",
        "shielded.allow_simulated=true",
    ]
    cfg = load_config(None, overrides)
    num_labels = 5 if args.task == "seq-cls" else None
    vocab = load_model(args.model, args.task, num_labels).model.config.vocab_size  # type: ignore[arg-type]
    batches = _batches(args, min(vocab, 30000), args.steps + 1)
    shielded_cfg = party_config(cfg, num_labels, args.steps + 1)
    plain_cfg = {**shielded_cfg, "offload": False}
    eager_cfg = {**shielded_cfg, "fused": False}

    print(
        f"# shielded (Method 1) · model {args.model} ({args.task}) · batch {args.batch}×{args.seq}"
        f" · LoRA r=8 · float32 · {cpu_name()} · torch {torch.__version__} · "
        f"{torch.get_num_threads()} threads · cuda: "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}"
    )
    names = ["plain", "shielded", *(["eager"] if args.eager else [])]
    times: dict[str, list[float]] = {name: [] for name in names}
    offline: list[float] = []
    with ExitStack() as stack:
        parties = {
            "plain": stack.enter_context(open_party(plain_cfg, allow_simulated=True)),
            "shielded": stack.enter_context(
                open_party(shielded_cfg, allow_simulated=True, device=args.device, gemm=args.gemm)
            ),
        }
        if args.eager:
            parties["eager"] = stack.enter_context(
                open_party(eager_cfg, allow_simulated=True, device=args.device, gemm=args.gemm)
            )
        info = parties["shielded"].info
        warm: dict[str, dict] = {}
        for i, batch in enumerate(batches):
            for name, party in parties.items():
                start = time.perf_counter()
                party.call("train_step", tensors=batch)
                if i > 0:  # the first step warms up (compiling kernels, pool pruning)
                    times[name].append(time.perf_counter() - start)
                if name != "plain":
                    reply = party.call("refill").meta
                    if i > 0 and name == "shielded":
                        offline.append(float(reply["seconds"]))  # type: ignore[arg-type]
                if i == 0:
                    warm[name] = dict(party.call("stats").meta)
        stats = {name: dict(party.call("stats").meta) for name, party in parties.items()}

    med = {k: statistics.median(v) for k, v in times.items()}
    steps = len(batches) - 1  # timed steps (after the warm-up)
    print(
        f"accelerator device: {info.get('accelerator_device')}  ·  exact GEMM chosen by probe: "
        f"{info.get('accelerator_backend')}  ·  probe ms: {info.get('accelerator_probe')}"
    )
    print(
        f"enclave factor GEMM: {info.get('enclave_gemm')}  ·  field p = {info.get('p')} "
        f"({info.get('field_bits')} bits) · w_bits {info.get('w_bits')} · min operand bits "
        f"fwd {info.get('fwd_bits_min')} bwd {info.get('bwd_bits_min')} · maps {info.get('maps')}"
        f" · fused elementwise kernels: {stats['shielded'].get('fused_kernels')}"
    )
    print(f"{'party':<10}{'median step s':>15}{'÷ plain':>10}{'peak RSS MB':>14}")
    for name in names:
        print(
            f"{name:<10}{med[name]:>15.3f}{med[name] / med['plain']:>10.2f}"
            f"{int(stats[name]['peak_rss_bytes']) / 2**20:>14.0f}"
        )
    print(
        f"offline precompute per step (pool refill): {statistics.median(offline):.3f} s "
        f"(÷ plain step {statistics.median(offline) / med['plain']:.2f})"
    )
    for name in names[1:]:
        _split(name, stats[name], warm[name], med[name], steps)
    print(
        json.dumps(
            {
                "median_s": med,
                "ratio": med["shielded"] / med["plain"],
                "offline_s": statistics.median(offline),
            }
        )
    )


def _split(name: str, stats: dict, warm: dict, median: float, steps: int) -> None:
    """The online time split per timed step (the warm-up step's share taken out)."""

    def per_step(key: str) -> float:
        return (float(stats[key]) - float(warm[key])) / steps

    keys = ("encode", "mask", "transfer", "worker", "check", "unmask")
    split = {k: per_step(f"offload_{k}") for k in keys}
    rest = median - sum(split.values())
    print(
        f"{name} online split per step (s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in split.items())
        + f", enclave-side ops and channel {rest:.3f}"
    )
    moved = per_step("offload_bytes_sent") + per_step("offload_bytes_received")
    print(
        f"{name}: bytes to+from the accelerator per step: {moved / 2**20:.1f} MiB "
        f"({per_step('offload_products'):.0f} products/step); pool misses "
        f"{stats['pool_misses']}, pool held {int(stats['pool_bytes']) / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
