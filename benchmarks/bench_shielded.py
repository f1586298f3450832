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
backend the accelerator's probe chose (and its timings); the online time split (encode, mask,
transfer, worker products, Freivalds, unmask, enclave-side ops = the rest); bytes to and from
the accelerator per step; peak RSS of each enclave process. On a GPU machine also
shielded ÷ TEE-only (Slalom's metric) and shielded ÷ plain GPU step.

The enclave is a simulation (no hardware protection): the figures are the cost of the software
path, not of SGX/TDX memory encryption.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from shieldtune.config import load_config  # noqa: E402
from shieldtune.models import load_model  # noqa: E402
from shieldtune.recipes.shielded import open_party, party_config  # noqa: E402
from shieldtune.tee.backends.simulated import PLATFORM_KEY_ENV  # noqa: E402


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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

    print(
        f"# shielded (Method 1) · model {args.model} ({args.task}) · batch {args.batch}×{args.seq}"
        f" · LoRA r=8 · float32 · {_cpu_name()} · torch {torch.__version__} · "
        f"{torch.get_num_threads()} threads · cuda: "
        f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}"
    )
    times: dict[str, list[float]] = {"plain": [], "shielded": []}
    offline: list[float] = []
    with (
        open_party(plain_cfg, allow_simulated=True) as plain,
        open_party(shielded_cfg, allow_simulated=True, device=args.device, gemm=args.gemm) as sh,
    ):
        info = sh.info
        for i, batch in enumerate(batches):
            for name, party in (("plain", plain), ("shielded", sh)):
                start = time.perf_counter()
                party.call("train_step", tensors=batch)
                if i > 0:  # the first step warms up (allocations, pool pruning)
                    times[name].append(time.perf_counter() - start)
            reply = sh.call("refill").meta
            if i > 0:
                offline.append(float(reply["seconds"]))  # type: ignore[arg-type]
        stats = dict(sh.call("stats").meta)
        plain_stats = dict(plain.call("stats").meta)

    med = {k: statistics.median(v) for k, v in times.items()}
    steps = len(batches)
    print(
        f"accelerator device: {info.get('accelerator_device')}  ·  exact GEMM chosen by probe: "
        f"{info.get('accelerator_backend')}  ·  probe ms: {info.get('accelerator_probe')}"
    )
    print(
        f"enclave factor GEMM: {info.get('enclave_gemm')}  ·  field p = {info.get('p')} "
        f"({info.get('field_bits')} bits) · w_bits {info.get('w_bits')} · min operand bits "
        f"fwd {info.get('fwd_bits_min')} bwd {info.get('bwd_bits_min')} · maps {info.get('maps')}"
    )
    print(f"{'party':<10}{'median step s':>15}{'÷ plain':>10}{'peak RSS MB':>14}")
    print(
        f"{'plain':<10}{med['plain']:>15.3f}{1.0:>10.2f}"
        f"{int(plain_stats['peak_rss_bytes']) / 2**20:>14.0f}"
    )
    print(
        f"{'shielded':<10}{med['shielded']:>15.3f}{med['shielded'] / med['plain']:>10.2f}"
        f"{int(stats['peak_rss_bytes']) / 2**20:>14.0f}"
    )
    print(
        f"offline precompute per step (pool refill): {statistics.median(offline):.3f} s "
        f"(÷ plain step {statistics.median(offline) / med['plain']:.2f})"
    )
    keys = ("encode", "mask", "transfer", "worker", "check", "unmask")
    split = {k: float(stats[f"offload_{k}"]) / steps for k in keys}  # type: ignore[arg-type]
    rest = med["shielded"] - sum(split.values())
    print(
        "online split per step (s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in split.items())
        + f", enclave-side ops and channel {rest:.3f}"
    )
    per_step = (int(stats["offload_bytes_sent"]) + int(stats["offload_bytes_received"])) / steps
    print(
        f"bytes to+from the accelerator per step: {per_step / 2**20:.1f} MiB "
        f"({int(stats['offload_products']) // steps} products/step); pool misses "
        f"{stats['pool_misses']}, pool held {int(stats['pool_bytes']) / 2**20:.0f} MiB"
    )
    print(
        json.dumps(
            {
                "median_s": med,
                "ratio": med["shielded"] / med["plain"],
                "offline_s": statistics.median(offline),
            }
        )
    )


if __name__ == "__main__":
    main()
