"""Step time and peak memory of every plain (insecure) mode, one subprocess per mode.

    python benchmarks/bench_plain_modes.py --model minilm --batch 16 --seq 128 --steps 5
    python benchmarks/bench_plain_modes.py --model smollm2          # causal LM, 8 x 128

Each mode runs in its own process so its peak memory is its own (CPU: max RSS; CUDA: max
allocated). Ratios are against local LoRA measured in the same run. Runs unchanged on CPU or
CUDA (--device auto picks CUDA when present). ``step s`` is the best of --steps timed steps
(robust to other load on a shared machine); the median is printed beside it. The header names
the torch build, threads and CUDA device, and the load average before and after the run.

Task, batch and sequence length default per model (:data:`MODEL_DEFAULTS`): the decoder-only
LLM ``smollm2`` trains as a causal LM on 8 x 128 tokens (every token a target, as in
pre-training); other models as 5-class sequence classifiers on 16 x 128.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

MODES = {
    "local-lora": ("local", {"method": "lora", "rank": 8}, None),
    "local-prefix": ("local", {"method": "prefix", "num_virtual_tokens": 16}, None),
    "local-full": ("local", {"method": "full"}, None),
    "plain-split-lora": ("split", {"method": "lora", "rank": 8}, None),
    "plain-split-spf1%+lora": (
        "split",
        {"method": "lora", "rank": 8},
        {"method": "spf", "density": 0.01, "saliency": "magnitude"},
    ),
}

MODEL_DEFAULTS: dict[str, dict[str, object]] = {
    "smollm2": {"task": "causal-lm", "batch": 8, "seq": 128},
    "tiny-llama": {"task": "causal-lm"},
    "tiny-qwen2": {"task": "causal-lm"},
    "tiny-gpt2": {"task": "causal-lm"},
}
"""Per-model defaults of --task / --batch / --seq; any other model: seq-cls, 16 x 128."""

FALLBACK = {"task": "seq-cls", "batch": 16, "seq": 128}


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill --task / --batch / --seq left unset from the model's defaults."""
    chosen = {**FALLBACK, **MODEL_DEFAULTS.get(args.model, {})}
    for key, value in chosen.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def machine_line() -> str:
    """torch build, threads and accelerator of this process."""
    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"torch {torch.__version__} · {torch.get_num_threads()} threads · cuda: {cuda}"


def load_line() -> str:
    """The 1/5/15-minute load average (other work sharing the cores skews CPU times)."""
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average n/a"


def run_one(args: argparse.Namespace) -> dict:
    import torch

    from shieldtune.adapters import ADAPTERS
    from shieldtune.config import adapter_settings
    from shieldtune.models import full_slice, load_model, slice_model
    from shieldtune.recipes import split_step
    from shieldtune.training import autocast, make_optim, task_loss

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    torch.manual_seed(0)
    kind, back_spec, front_spec = MODES[args.mode]
    task = "causal-lm" if args.task == "causal-lm" else "seq-cls"
    loaded = load_model(args.model, task, None if task == "causal-lm" else 5)
    model = loaded.model.to(device)
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab - 1, (args.batch, args.seq), device=device)
    mask = torch.ones_like(ids)
    labels = (
        ids.clone() if task == "causal-lm" else torch.randint(0, 5, (args.batch,), device=device)
    )
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    if kind == "local":
        whole = full_slice(model)
        method, settings = adapter_settings(back_spec, "adapter")
        adapter = ADAPTERS.get(method).attach(whole, model, settings)
        optims = [make_optim(adapter.trainable_parameters(), 1e-4)]

        def step() -> None:
            with autocast(args.precision):
                logits = whole(ids, mask)
            task_loss(logits, labels, task).backward()
    else:
        front, back = slice_model(model, args.cut)
        method, settings = adapter_settings(back_spec, "adapter")
        optims = [
            make_optim(
                ADAPTERS.get(method).attach(back, model, settings).trainable_parameters(), 1e-4
            )
        ]
        for p in front.parameters():
            p.requires_grad_(False)
        if front_spec:
            fm, fs = adapter_settings(front_spec, "split.front_adapter")
            optims.append(
                make_optim(ADAPTERS.get(fm).attach(front, model, fs).trainable_parameters(), 1e-4)
            )

        def step() -> None:
            split_step(front, back, batch, task, args.precision, train_front=bool(front_spec))

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        for o in optims:
            o.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        timed()
    times = [timed() for _ in range(args.steps)]
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "mode": args.mode,
        "device": str(device),
        "step_s": min(times),
        "median_s": statistics.median(times),
        "peak_mb": peak_mb,
        "trainable": sum(o.num_params() for o in optims),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="minilm")
    parser.add_argument(
        "--task", default=None, choices=["seq-cls", "causal-lm"], help="default: per model"
    )
    parser.add_argument("--batch", type=int, default=None, help="default: per model")
    parser.add_argument("--seq", type=int, default=None, help="default: per model")
    parser.add_argument("--cut", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print one JSON line per mode")
    args = resolve_defaults(parser.parse_args())
    if args.mode:  # child process
        print(json.dumps(run_one(args)))
        return
    print(
        f"# plain modes · model {args.model} ({args.task}) · batch {args.batch}×{args.seq} · "
        f"cut {args.cut} · {args.precision} · {platform.processor() or platform.machine()}"
    )
    print(f"# {machine_line()} · {load_line()} (before)")
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--mode", mode, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"{mode}: failed\n{out.stderr[-2000:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next((r["step_s"] for r in rows if r["mode"] == "local-lora"), None)
    print(
        f"{'mode':26} {'device':7} {'step s':>8} {'median':>8} {'÷ local-lora':>12} "
        f"{'peak MB':>9} {'trainable':>11}"
    )
    for r in rows:
        ratio = f"{r['step_s'] / base:.2f}" if base else "-"
        print(
            f"{r['mode']:26} {r['device']:7} {r['step_s']:8.3f} {r['median_s']:8.3f} {ratio:>12} "
            f"{r['peak_mb']:9.0f} {r['trainable']:11,}"
        )
        if args.json:
            print(json.dumps(r))
    print(f"# {load_line()} (after)")


if __name__ == "__main__":
    main()
