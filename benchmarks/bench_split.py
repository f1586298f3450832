"""Cost of secure split fine-tuning next to plain split, measured in one run.

    PYTHONPATH=src python benchmarks/bench_split.py [--model minilm --batch 16 --seq 128
        --cut 2 --steps 10 --clients 1,2,4]

1. Step time: plain-split (front and back slice in this process, no protection) and split (the
   back slice + LoRA in a SIMULATED enclave process behind the attested channel, reached over
   gRPC on loopback), same model, batch, cut, SPF (1 %, magnitude) on the front, LoRA on the
   back. Steps alternate between the two modes so background load hits both alike; medians.
   The enclave gets the same number of CPU threads as this process.
2. Bytes per step on the wire (gRPC payloads: sealed records both ways) next to the raw
   hidden-state tensor.
3. Server throughput (samples/s) with 1, 2 and 4 concurrent clients, each its own process
   training against the one enclave (shared LoRA, steps serialised inside the enclave).

The enclave is a simulation (no hardware protection): these numbers are the cost of the
software path (framing, AES-GCM, gRPC, the enclave pipe), not of SGX/TDX memory encryption.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from shieldtune.adapters import ADAPTERS  # noqa: E402
from shieldtune.config import adapter_settings  # noqa: E402
from shieldtune.models import load_model, slice_model  # noqa: E402
from shieldtune.split.client import SplitClient, attach_front_adapter  # noqa: E402
from shieldtune.split.service import SplitService, connect, program_config, split_policy  # noqa: E402
from shieldtune.split.step import client_backward, client_forward, server_step  # noqa: E402
from shieldtune.tee.backends.simulated import PLATFORM_KEY_ENV  # noqa: E402
from shieldtune.training.rng import CLIENT_STREAM, SERVER_STREAM, RngStream  # noqa: E402
from shieldtune.training.steps import make_optim  # noqa: E402

TRAIN = SimpleNamespace(
    weight_decay=0.0, grad_clip=1.0, schedule="constant", warmup_ratio=0.0, precision="float32"
)
BACK = {"method": "lora", "rank": 8}


def _front_spec(args: argparse.Namespace) -> dict[str, Any]:
    return {"method": "spf", "density": args.density, "saliency": "magnitude"}


def _batch(args: argparse.Namespace, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab - 1, (args.batch, args.seq), generator=gen)
    labels = torch.randint(0, 5, (args.batch,), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _program(args: argparse.Namespace, steps: int) -> dict[str, Any]:
    return program_config(
        model=args.model,
        task="seq-cls",
        num_labels=5,
        cut=args.cut,
        adapter=BACK,
        lr=1e-4,
        train=TRAIN,
        seed=0,
        total_steps=steps,
        wire_dtype=args.wire,
    )


def _plain(args: argparse.Namespace) -> Any:
    """The plain-split step (the baseline), built as the plain-split recipe builds it."""
    torch.manual_seed(0)
    model = load_model(args.model, "seq-cls", 5).model
    front, back = slice_model(model, args.cut)
    method, settings = adapter_settings(BACK, "adapter")
    server_opt = make_optim(
        ADAPTERS.get(method).attach(back, model, settings).trainable_parameters(), 1e-4, TRAIN
    )
    for p in front.parameters():
        p.requires_grad_(False)
    fm, fs = adapter_settings(_front_spec(args), "split.front_adapter")
    spf = ADAPTERS.get(fm).attach(front, model, fs)
    client_opt = make_optim(spf.trainable_parameters(), 1e-4, TRAIN)
    client_rng, server_rng = RngStream(CLIENT_STREAM), RngStream(SERVER_STREAM)

    def step(batch: dict[str, torch.Tensor]) -> float:
        front.train(), back.train()
        with client_rng.active():
            hidden = client_forward(front, batch, "float32")  # (B, T, d)
        with server_rng.active():
            loss, grad = server_step(
                back, hidden, batch["attention_mask"], batch["labels"], "seq-cls", "float32"
            )
        client_backward(hidden, grad)
        server_opt.step()
        client_opt.step()
        return float(loss)

    return step, model.config


def _client(args: argparse.Namespace, address: str, program: dict, key_hex: str) -> Any:
    """A split client (front slice + SPF) connected to the service over gRPC."""
    policy = split_policy(program, allow_simulated=True, simulated_platform_keys=[key_hex])
    remote, transport = connect(address, policy, wire_dtype=args.wire)
    remote.init()
    model = load_model(args.model, "seq-cls", 5).model
    front, _ = slice_model(model, args.cut)
    for p in front.parameters():
        p.requires_grad_(False)
    spf = attach_front_adapter(front, model, _front_spec(args), remote, {}, batch_size=1, seed=0)
    client = SplitClient(
        front,
        remote,
        task="seq-cls",
        precision="float32",
        rng=RngStream(CLIENT_STREAM),
        optim=make_optim(spf.trainable_parameters(), 1e-4, TRAIN),
    )
    return client, transport, model.config.vocab_size


def _timed(fn: Any, *a: Any) -> float:
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def child(args: argparse.Namespace) -> None:
    """A throughput client process: connect, say ready, wait for go, train, report."""
    client, transport, vocab = _client(args, args.address, json.loads(args.program), args.key)
    batches = [_batch(args, vocab, s) for s in range(args.steps)]
    client.train_step(batches[0])  # warm-up
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.time()
    for b in batches:
        client.train_step(b)
    end = time.time()
    client.finish()
    transport.close()
    print(json.dumps({"start": start, "end": end, "samples": args.steps * args.batch}), flush=True)


def throughput(args: argparse.Namespace, service: SplitService, program: dict, n: int) -> float:
    """Samples/s of ``n`` client processes training at once against one enclave."""
    cmd = [sys.executable, __file__, "--child", "--address", service.address]
    cmd += ["--program", json.dumps(program), "--key", str(service.platform_public_key)]
    cmd += [f"--{k}={getattr(args, k)}" for k in ("model", "batch", "seq", "cut", "wire")]
    cmd += [f"--steps={args.tp_steps}", f"--density={args.density}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // n))}
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(n)
    ]
    for p in procs:  # every client connected and warmed up
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.communicate(timeout=1800)[0].strip().splitlines()[-1]) for p in procs]
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    return sum(r["samples"] for r in results) / wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--cut", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--wire", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--clients", default="1,2,4", help="throughput: concurrent clients")
    parser.add_argument("--tp-steps", type=int, default=6, help="throughput: steps per client")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--program", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    if args.child:
        child(args)
        return
    os.environ.setdefault(PLATFORM_KEY_ENV, str(Path(tempfile.mkdtemp()) / "sim_platform_key"))
    threads = torch.get_num_threads()
    print(
        f"# split vs plain-split · {args.model} · batch {args.batch}×{args.seq} · cut {args.cut} · "
        f"SPF {args.density:.0%} front + LoRA r8 back · wire {args.wire} · {threads} threads · "
        f"{platform.processor() or platform.machine()} · enclave SIMULATED (no hardware protection)"
    )
    program = _program(args, 1000)
    plain_step, config = _plain(args)
    batches = [_batch(args, config.vocab_size, s) for s in range(args.warmup + args.steps)]
    with SplitService(program, threads=threads) as service:
        client, transport, _ = _client(args, service.address, program, service.platform_public_key)
        plain_t, split_t = [], []
        for i, b in enumerate(batches):  # alternate, so background load hits both modes alike
            tp, ts = _timed(plain_step, b), _timed(client.train_step, b)
            if i >= args.warmup:
                plain_t.append(tp)
                split_t.append(ts)
        sent, received = transport.bytes_sent, transport.bytes_received
        n_steps = len(batches)
        client.finish()
        transport.close()
        p, s = statistics.median(plain_t), statistics.median(split_t)
        hidden = args.batch * args.seq * config.hidden_size * (4 if args.wire == "float32" else 2)
        print(f"{'plain-split step':28} {p * 1e3:9.1f} ms")
        print(
            f"{'split step (gRPC + enclave)':28} {s * 1e3:9.1f} ms   "
            f"ratio {s / p:.2f} (target <= 1.3)"
        )
        print(
            f"{'bytes per step':28} {(sent + received) / n_steps / 2**20:9.2f} MiB "
            f"(up {sent / n_steps / 2**20:.2f}, down {received / n_steps / 2**20:.2f}; "
            f"hidden states {hidden / 2**20:.2f} MiB)"
        )
        rows = {}
        for n in [int(c) for c in args.clients.split(",") if c]:
            rows[n] = throughput(args, service, program, n)
            print(f"{'throughput, ' + str(n) + ' client(s)':28} {rows[n]:9.1f} samples/s")
    print(
        json.dumps(
            {
                "plain_step_s": p,
                "split_step_s": s,
                "ratio": s / p,
                "bytes_per_step": (sent + received) / n_steps,
                "throughput_samples_per_s": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
