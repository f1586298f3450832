"""Cost of the TEE runtime next to plain baselines measured in the same run.

    PYTHONPATH=src python benchmarks/bench_tee.py [--repeats 20] [--calls 2000]

1. Channel throughput: a float32 tensor of 1 MB and of 16 MB is framed, encrypted (AES-256-GCM),
   decrypted and parsed, as one request crosses the attested channel ("AEAD only": the same
   bytes sealed and opened without framing). Baseline: a plain memory copy of the same tensor
   (``torch.Tensor.clone``) and of its bytes.
2. Call latency: an empty ECALL into a simulated enclave process (typed frame over a pipe),
   the same call over the encrypted channel, and a plain pipe round trip to a child process that
   echoes 8 bytes (no framing, no crypto). Medians; ratios against the plain pipe.

Large fresh buffers dominate the channel numbers where page faults are costly (VMs): glibc hands
buffers above its mmap/trim thresholds back to the OS after each record. Compare with
``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296`` to see the cost of the
cryptography itself.

The simulated enclave uses a throw-away platform key in a temporary folder. It is a SIMULATED
enclave (no hardware protection): these numbers are the cost of the software path only.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from shieldtune.crypto.channel import ClientHello, client_hello, client_session, enclave_accept  # noqa: E402
from shieldtune.crypto.framing import decode_frame, encode_frame  # noqa: E402

_ECHO_CHILD = r"""
import os
while True:
    b = os.read(0, 8)
    if not b:
        break
    os.write(1, b)
"""


def _timeit(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_channel(repeats: int) -> list[tuple[str, float, float, float, float]]:
    """(size, channel MB/s, AEAD-only MB/s, clone MB/s, bytes-copy MB/s) per tensor size."""
    keys, hello = client_hello()
    enclave_public, _, enclave = enclave_accept(ClientHello.from_bytes(hello.to_bytes()))
    client = client_session(keys, hello, enclave_public)
    rows = []
    for mb in (1, 16):
        x = torch.randn(mb * 2**20 // 4)  # (n,) float32, exactly mb MiB
        nbytes = x.numel() * 4
        raw = x.numpy().tobytes()

        def channel(x: torch.Tensor = x) -> None:
            frame = decode_frame(enclave.open(client.seal(encode_frame({"ecall": "f"}, {"x": x}))))
            assert frame.tensors["x"].numel() == x.numel()

        def aead_only(raw: bytes = raw) -> None:
            enclave.open(client.seal(raw))

        t_channel = _timeit(channel, repeats)
        t_aead = _timeit(aead_only, repeats)
        t_clone = _timeit(lambda x=x: x.clone(), repeats)
        t_bytes = _timeit(lambda raw=raw: bytearray(raw), repeats)
        mbps = [nbytes / t / 1e6 for t in (t_channel, t_aead, t_clone, t_bytes)]
        rows.append((f"{mb} MB", *mbps))
    return rows


def bench_pipe(calls: int) -> float:
    """Median seconds of an 8-byte round trip to a plain child process."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _ECHO_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
    )
    assert proc.stdin is not None and proc.stdout is not None
    w, r = proc.stdin, proc.stdout

    def roundtrip() -> None:
        w.write(b"12345678")
        got = b""
        while len(got) < 8:
            chunk = r.read(8 - len(got))
            if not chunk:
                raise RuntimeError("echo child exited")
            got += chunk

    t = _timeit(roundtrip, calls, warmup=50)
    w.close()
    proc.wait()
    return t


def bench_enclave(calls: int) -> tuple[float, float]:
    """Median seconds of an empty ECALL, in the clear and over the attested channel."""
    from shieldtune.tee.attestation import Policy, Verifier
    from shieldtune.tee.client import connect_local
    from shieldtune.tee.enclave import create_enclave

    with tempfile.TemporaryDirectory() as tmp:
        with create_enclave("simulated", "echo", platform_key=Path(tmp) / "key") as enclave:
            plain = _timeit(lambda: enclave.call("empty"), calls, warmup=50)
            policy = Policy(
                allow_simulated=True,
                simulated_platform_keys=[enclave.platform.public_key_hex],  # type: ignore[attr-defined]
                allowed_measurements=[enclave.measurement],
            )
            client, _ = connect_local(enclave, Verifier(policy))
            channel = _timeit(lambda: client.call("empty"), calls, warmup=50)
    return plain, channel


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per size")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per latency row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"# bench_tee  python {platform.python_version()}  torch {torch.__version__}  "
        f"cpu {platform.processor() or platform.machine()}  cores {os.cpu_count()}"
    )
    print("# SIMULATED enclave (no hardware protection): software cost only\n")

    print("channel: frame + AES-256-GCM encrypt + decrypt + parse, vs plain memory copy")
    print(
        f"{'tensor':>8} {'channel MB/s':>13} {'AEAD only':>10} {'clone MB/s':>11} "
        f"{'bytes MB/s':>11} {'clone/channel':>14}"
    )
    for label, ch, aead, clone, copy in bench_channel(args.repeats):
        print(f"{label:>8} {ch:13.0f} {aead:10.0f} {clone:11.0f} {copy:11.0f} {clone / ch:13.1f}x")

    pipe = bench_pipe(args.calls)
    plain, channel = bench_enclave(args.calls)
    print("\nround trip of an empty call (median)")
    print(f"{'path':<44} {'latency us':>11} {'vs pipe':>8}")
    for name, t in (
        ("plain pipe, 8 bytes (baseline)", pipe),
        ("empty ECALL, simulated enclave (clear frame)", plain),
        ("empty ECALL over the attested channel", channel),
    ):
        print(f"{name:<44} {t * 1e6:11.1f} {t / pipe:7.1f}x")


if __name__ == "__main__":
    main()
