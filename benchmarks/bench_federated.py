"""Round time and bytes per client: plain-fedavg vs secure-fedavg, measured in one run.

    python benchmarks/bench_federated.py --model minilm --dataset medical_abstracts \
        --clients 3 --rounds 3 --max-train 600

Both modes run the same config, seeds and data, one after the other, as Flower simulations on
this machine (in-process grid). ``round s`` is the best (shortest) wall time of rounds 2..R
(train + aggregate + evaluate: robust to other load on a shared machine; the median is in the
JSON line), so model loading and the secure handshake (round 1) are reported apart as
``round 1 s``. ``bytes/client/round`` is the payload Flower carries per client and round,
both directions (arrays, metrics, configs; in secure-fedavg: ciphertext records).
secure-fedavg runs on the SIMULATED enclave backend: its cost is the software overhead of the
channel, the enclave process and the relays, not of a hardware TEE.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def run_mode(mode: str, args: argparse.Namespace, out: Path) -> dict:
    """Run one mode; return its timing and traffic figures."""
    from shieldtune.config import load_config
    from shieldtune.recipes import RECIPES

    overrides = [
        f"mode={mode}",
        f"model.name={args.model}",
        f"data.dataset={args.dataset}",
        f"data.max_length={args.seq}",
        f"adapter.method={args.adapter}",
        f"train.batch_size={args.batch}",
        "train.lr=0.001",
        f"federated.num_clients={args.clients}",
        f"federated.rounds={args.rounds}",
        "federated.local_epochs=1",
        f"federated.partition={args.partition}",
        "federated.allow_simulated=true",
        f"output_dir={out}",
        f"run_name={mode}",
    ]
    if args.max_train:
        overrides += [f"data.max_train_examples={args.max_train}"]
    if args.max_test:
        overrides += [f"data.max_test_examples={args.max_test}"]
    cfg = load_config(None, overrides)
    run = RECIPES[mode](cfg)
    summary = json.loads((run / "summary.json").read_text())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ends = [x["time_s"] for x in lines if x.get("kind") == "eval"]
    rounds = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return {
        "mode": mode,
        "accuracy": summary.get("accuracy"),
        "round1_s": ends[0] if ends else None,
        "round_s": min(rounds) if rounds else None,
        "round_median_s": statistics.median(rounds) if rounds else None,
        "bytes_per_client_round": summary["bytes_to_client_per_round"]
        + summary["bytes_to_server_per_round"],
        "bytes_to_client": summary["bytes_to_client_per_round"],
        "bytes_to_server": summary["bytes_to_server_per_round"],
    }


def main() -> None:
    """Parse options, run both modes, print a table and one JSON line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--dataset", default="medical_sample")
    p.add_argument("--adapter", default="lora")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--partition", default="iid", choices=["iid", "dirichlet"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--max-train", type=int, default=0)
    p.add_argument("--max-test", type=int, default=0)
    args = p.parse_args()
    if args.rounds < 2:
        p.error("--rounds must be >= 2 (round 1 holds the set-up and is reported apart)")
    from shieldtune.cli._common import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        plain = run_mode("plain-fedavg", args, Path(tmp))
        secure = run_mode("secure-fedavg", args, Path(tmp))
    ratio = secure["round_s"] / plain["round_s"] if plain["round_s"] else float("nan")
    print(
        f"{args.model} · {args.adapter} · {args.clients} clients · {args.rounds} rounds · "
        f"{platform.processor() or platform.machine()} (secure-fedavg: SIMULATED enclave)"
    )
    print(f"{'mode':<14} {'round s':>8} {'round 1 s':>10} {'bytes/client/round':>19} {'acc':>6}")
    for r in (plain, secure):
        print(
            f"{r['mode']:<14} {r['round_s']:>8.3f} {r['round1_s']:>10.3f} "
            f"{r['bytes_per_client_round']:>19,} {r['accuracy']:>6.3f}"
        )
    print(f"secure / plain round time: {ratio:.2f}x")
    print(json.dumps({"plain": plain, "secure": secure, "round_time_ratio": ratio}))


if __name__ == "__main__":
    main()
