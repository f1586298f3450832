"""The untrusted accelerator of Method 1: frozen linear maps on one-time-padded inputs.

    enclave --(Unix socket: small control frames)----------------------> worker (own OS process)
    enclave --(shared memory: x̃ = enc(x) + R_c mod p, (n, in) int64)--> worker
    worker  --(shared memory: x̃ · W_intᵀ mod p, (n, out) int64)-------> enclave

The worker holds the public base weights (it loads the model itself, quantises the frozen maps
exactly as the enclave does, and proves it with a digest per map), picks its exact GEMM backend by
a start-up probe on the model's own shapes (or the configured one), and records every tensor it
is sent in a boundary audit log, with the protection the sender declared. It is *untrusted*: the
enclave copies each result out of shared memory before checking it (Freivalds) and never
unpickles anything from it (control messages are :mod:`shieldtune.crypto.framing` frames).

Run by :class:`AcceleratorProcess` (host side) as ``python -m shieldtune.shielded.worker``;
:class:`AcceleratorLink` is the enclave's end.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from shieldtune.crypto.framing import Frame, FrameLimits, MetaValue, decode_frame, encode_frame
from shieldtune.errors import EnclaveError, IntegrityError
from shieldtune.shielded.field import Field, QuantizedWeight
from shieldtune.tee.audit import AuditLog, TensorInfo
from shieldtune.tee.pipe import read_message, write_message

__all__ = ["AcceleratorLink", "AcceleratorProcess", "weight_digest", "serve"]

log = logging.getLogger("shieldtune.shielded")
_LIMITS = FrameLimits(max_bytes=64 * 2**20)
_ENCLAVE = "shielded-party"


def weight_digest(qw: QuantizedWeight) -> str:
    """SHA-256 (hex) of a quantised map: shape, bits, integer weights (both sides must agree)."""
    h = hashlib.sha256(f"{tuple(qw.w_int.shape)}|{qw.w_bits}|".encode())
    h.update(qw.w_int.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _shared(path: Path, elements: int) -> torch.Tensor:
    """An int64 tensor over a file in shared memory (MAP_SHARED: both processes see writes)."""
    return torch.from_file(str(path), shared=True, size=elements, dtype=torch.int64)


# ---------------------------------------------------------------------------------- worker side
class _Worker:
    """State of the worker process (one enclave connection at a time)."""

    def __init__(
        self,
        shm_dir: Path,
        audit: AuditLog | None,
        capture: Path | None,
        limit: int,
        tamper: str = "none",
        tamper_after: int = 0,
    ) -> None:
        self.shm_dir, self.audit, self.capture, self.capture_limit = shm_dir, audit, capture, limit
        self.tamper, self.tamper_after, self.products = tamper, tamper_after, 0
        self.captured = 0
        self.layers: list[Any] = []  # PreparedWeight per layer id
        self.shapes: list[tuple[int, int]] = []  # (out, in)
        self.gemm: Any = None
        self.device = torch.device("cpu")
        self.rows = 0

    def setup(self, meta: dict[str, MetaValue]) -> dict[str, MetaValue]:
        from shieldtune.models import load_model  # the worker has the public model
        from shieldtune.shielded.field import quantize_weight
        from shieldtune.shielded.gemm import probe_cached, resolve_backend
        from shieldtune.shielded.linear import frozen_linears

        names = str(meta["names"]).split(",")
        digests = str(meta["digests"]).split(",")
        field = Field(int(meta["p"]))  # type: ignore[arg-type]
        self.p = field.p
        w_bits, self.rows = int(meta["w_bits"]), int(meta["rows"])  # type: ignore[arg-type]
        device = str(meta.get("device") or "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        num_labels = meta.get("num_labels")
        loaded = load_model(
            str(meta["model"]),
            str(meta["task"]),  # type: ignore[arg-type]
            None if num_labels is None else int(num_labels),  # type: ignore[arg-type]
            seed=int(meta["seed"]),  # type: ignore[arg-type]
        )
        available = {f.name: f for f in frozen_linears(loaded.model.requires_grad_(False))}
        qws = []
        for name, digest in zip(names, digests, strict=True):
            if name not in available:
                raise EnclaveError(f"accelerator: the public model has no frozen map {name!r}")
            qw = quantize_weight(available[name].weight, w_bits)
            if weight_digest(qw) != digest:
                raise IntegrityError(
                    f"accelerator: weights of {name!r} differ from the enclave's (other model?)"
                )
            qws.append(qw)
        del loaded, available
        backend = str(meta.get("backend") or "auto")
        cache = Path(str(meta.get("cache_dir") or Path.home() / ".cache" / "shieldtune"))
        probe = probe_cached(field, qws, self.rows, self.device, cache_dir=cache)
        self.gemm = resolve_backend(None if backend == "auto" else backend, probe)
        self.layers = [self.gemm.prepare(qw, field, self.device) for qw in qws]
        self.shapes = [tuple(qw.w_int.shape) for qw in qws]  # type: ignore[misc]
        width = max(max(s) for s in self.shapes)
        self.x_buf = _file(self.shm_dir / "in.bin", self.rows * width)
        self.y_buf = _file(self.shm_dir / "out.bin", self.rows * width)
        return {
            "backend": self.gemm.name,
            "probe": json_dumps(probe.timings_ms),
            "unsupported": json_dumps(probe.unsupported),
            "device": str(self.device),
            "machine": probe.machine,
            "in_path": str(self.shm_dir / "in.bin"),
            "out_path": str(self.shm_dir / "out.bin"),
            "elements": self.rows * width,
        }

    def product(self, meta: dict[str, MetaValue], backward: bool) -> dict[str, MetaValue]:
        layer, n = int(meta["layer"]), int(meta["rows"])  # type: ignore[arg-type]
        if not 0 <= layer < len(self.layers) or not 0 < n <= self.rows:
            raise EnclaveError(f"accelerator: bad request (layer {layer}, rows {n})")
        out_f, in_f = self.shapes[layer]
        d_in, d_out = (out_f, in_f) if backward else (in_f, out_f)
        sent = self.x_buf[: n * d_in].view(n, d_in)  # (n, d_in) masked, in [0, p)
        call = f"{'backward' if backward else 'forward'}:{layer}"
        protection = str(meta.get("protection", "clear"))
        self._record("enclave->host", call, sent, "x_masked", protection)
        if self.capture is not None and self.captured < self.capture_limit:
            from safetensors.torch import save_file

            save_file(
                {"sent": sent.clone()},
                str(self.capture / f"{self.captured:06d}.safetensors"),
                metadata={"call": call},
            )
            self.captured += 1
        start = time.perf_counter()
        x = sent.to(self.device, non_blocking=False)
        pw = self.layers[layer]
        y = self.gemm.backward(pw, x) if backward else self.gemm.forward(pw, x)  # (n, d_out)
        y = y.cpu()
        rows, cols = n, d_out
        self.products += 1
        if self.tamper != "none" and self.products > self.tamper_after:  # a lying accelerator
            if self.tamper == "flip":
                y[n // 2, d_out // 2] = (y[n // 2, d_out // 2] + 1) % int(self.p)
            elif self.tamper == "shape":
                cols = d_out - 1
        self.y_buf[: n * d_out].view(n, d_out).copy_(y)
        seconds = time.perf_counter() - start
        self._record("host->enclave", call, y, "y_masked", protection)
        return {"seconds": seconds, "rows": rows, "cols": cols}

    def _record(self, direction: str, call: str, t: torch.Tensor, name: str, protection: str):
        if self.audit is None:
            return
        self.audit.record(
            enclave=_ENCLAVE,
            direction=direction,  # type: ignore[arg-type]
            call=call,
            nbytes=t.numel() * t.element_size(),
            protection=protection if protection in ("masked", "encrypted") else "clear",  # type: ignore[arg-type]
            tensors=(TensorInfo(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)),),
        )


def json_dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True)


def _file(path: Path, elements: int) -> torch.Tensor:
    with open(path, "wb") as f:
        f.truncate(elements * 8)
    return _shared(path, elements)


def serve(
    sock_path: Path,
    shm_dir: Path,
    audit: Path | None = None,
    capture: Path | None = None,
    limit: int = 0,
    tamper: str = "none",
    tamper_after: int = 0,
) -> None:
    """Accept enclave connections on ``sock_path`` and answer them until killed, or until the
    host that started this worker is gone (never outlive it: it owns the socket and memory)."""
    worker = _Worker(
        shm_dir, AuditLog(audit) if audit else None, capture, limit, tamper, tamper_after
    )
    host = os.getppid()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(1)
    server.settimeout(1.0)
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if os.getppid() != host:  # the host died (we were re-parented): stop
                log.warning("accelerator: the host process is gone; exiting")
                return
            continue
        conn.settimeout(None)
        with conn, conn.makefile("rwb", buffering=0) as f:
            while True:
                try:
                    request = decode_frame(read_message(f, _LIMITS.max_bytes), _LIMITS)
                except EnclaveError:  # the enclave closed the connection
                    break
                op = request.meta.get("op")
                try:
                    if op == "setup":
                        reply = worker.setup(request.meta)
                    elif op in ("forward", "backward"):
                        reply = worker.product(request.meta, backward=op == "backward")
                    else:
                        raise EnclaveError(f"accelerator: unknown op {op!r}")
                    write_message(f, encode_frame({"ok": True, **reply}, None, _LIMITS))
                except Exception as err:  # report, keep serving
                    log.warning("accelerator request %r failed: %s", op, err)
                    msg = f"{type(err).__name__}: {err}"
                    write_message(f, encode_frame({"ok": False, "error": msg}, None, _LIMITS))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the worker process."""
    parser = argparse.ArgumentParser(prog="shieldtune.shielded.worker")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--shm-dir", type=Path, required=True)
    parser.add_argument("--audit", type=Path)
    parser.add_argument("--capture", type=Path)
    parser.add_argument("--capture-limit", type=int, default=64)
    # fault injection (tests of a lying accelerator): corrupt results after N good products
    parser.add_argument("--tamper", choices=("none", "flip", "shape"), default="none")
    parser.add_argument("--tamper-after", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="accelerator: %(message)s")
    serve(
        args.socket,
        args.shm_dir,
        args.audit,
        args.capture,
        args.capture_limit,
        args.tamper,
        args.tamper_after,
    )
    return 0


# ---------------------------------------------------------------------------------- enclave side
class AcceleratorLink:
    """The enclave's end of the worker: sends masked operands, returns *copies* of the results.

    Args:
        socket_path: The worker's Unix socket.
        timeout_s: Longest wait for one reply.
    """

    def __init__(self, socket_path: str, timeout_s: float = 300.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(socket_path)
        except OSError as err:
            raise EnclaveError(f"accelerator at {socket_path!r} is unreachable: {err}") from None
        self.file = self.sock.makefile("rwb", buffering=0)
        self.timeout_s = timeout_s
        self.shapes: list[tuple[int, int]] = []
        self.bytes_sent = self.bytes_received = 0
        self.seconds_worker = self.seconds_total = 0.0
        self.calls = 0

    def _call(self, meta: dict[str, MetaValue]) -> Frame:
        write_message(self.file, encode_frame(meta, None, _LIMITS))
        reply = decode_frame(read_message(self.file, _LIMITS.max_bytes, self.timeout_s), _LIMITS)
        if reply.meta.get("ok") is not True:
            raise EnclaveError(f"accelerator refused {meta['op']!r}: {reply.meta.get('error')}")
        return reply

    def setup(self, shapes: list[tuple[int, int]], rows: int, **meta: MetaValue) -> dict[str, Any]:
        """Send the plan (model, field, bits, names, digests); map the shared buffers."""
        reply = self._call({"op": "setup", "rows": rows, **meta}).meta
        self.shapes, self.rows = shapes, rows
        n = int(reply["elements"])  # type: ignore[arg-type]
        self.x_buf = _shared(Path(str(reply["in_path"])), n)
        self.y_buf = _shared(Path(str(reply["out_path"])), n)
        return dict(reply)

    def product(self, layer: int, sent: torch.Tensor, backward: bool) -> torch.Tensor:
        """``sent · W_layerᵀ`` (forward) or ``sent · W_layer`` (backward) mod p, as computed by
        the worker: an untrusted (n, d_out) int64 copy the caller must check."""
        start = time.perf_counter()
        out_f, in_f = self.shapes[layer]
        n, d_in = sent.shape
        d_out = in_f if backward else out_f
        if d_in != (out_f if backward else in_f) or n > self.rows:
            raise EnclaveError(
                f"accelerator: operand {tuple(sent.shape)} does not fit layer {layer}"
            )
        self.x_buf[: n * d_in].view(n, d_in).copy_(sent)  # leaves the enclave: masked
        meta = {
            "op": "backward" if backward else "forward",
            "layer": layer,
            "rows": n,
            "protection": "masked",
        }
        reply = self._call(meta)
        if (reply.meta.get("rows"), reply.meta.get("cols")) != (n, d_out):
            raise IntegrityError(
                f"accelerator returned a {reply.meta.get('rows')}x{reply.meta.get('cols')} "
                f"product for map {layer}, expected {n}x{d_out}; the step is aborted"
            )
        result = self.y_buf[: n * d_out].view(n, d_out).clone()  # copy first, then check
        self.bytes_sent += sent.numel() * 8
        self.bytes_received += result.numel() * 8
        self.seconds_worker += float(reply.meta.get("seconds", 0.0))  # type: ignore[arg-type]
        self.seconds_total += time.perf_counter() - start
        self.calls += 1
        return result

    def close(self) -> None:
        """Close the connection (the worker keeps running for the next one)."""
        try:
            self.file.close()
        finally:
            self.sock.close()


# ---------------------------------------------------------------------------------- host side
class AcceleratorProcess:
    """Host side: starts and stops the worker process and owns its socket and shared memory.

    Args:
        audit: Where the worker writes its boundary audit log (JSONL), if anywhere.
        capture: A folder where the worker saves the first ``capture_limit`` operands it is sent
            (what the accelerator sees; attacks and tests read them).
        capture_limit: How many operands to save.
        start_timeout_s: Longest wait for the worker to listen.
        tamper: Fault injection for tests: ``flip`` corrupts one entry of every result after
            ``tamper_after`` good ones, ``shape`` misreports the result's shape.
        tamper_after: Good products before tampering starts.
    """

    def __init__(
        self,
        audit: Path | None = None,
        capture: Path | None = None,
        capture_limit: int = 64,
        start_timeout_s: float = 60.0,
        tamper: str = "none",
        tamper_after: int = 0,
    ) -> None:
        self.audit, self.capture, self.capture_limit = audit, capture, capture_limit
        self.tamper, self.tamper_after = tamper, tamper_after
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: Path | None = None

    @property
    def socket_path(self) -> str:
        assert self.dir is not None, "start() first"
        return str(self.dir / "worker.sock")

    def start(self) -> AcceleratorProcess:
        """Launch the worker and wait until it listens.

        Raises:
            EnclaveError: It exited or did not come up in time.
        """
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = Path(tempfile.mkdtemp(prefix="shieldtune-accel-", dir=base))
        cmd = [
            sys.executable,
            "-m",
            "shieldtune.shielded.worker",
            "--socket",
            self.socket_path,
            "--shm-dir",
            str(self.dir),
        ]
        if self.audit is not None:
            cmd += ["--audit", str(self.audit)]
        if self.capture is not None:
            Path(self.capture).mkdir(parents=True, exist_ok=True)
            cmd += ["--capture", str(self.capture), "--capture-limit", str(self.capture_limit)]
        if self.tamper != "none":
            cmd += ["--tamper", self.tamper, "--tamper-after", str(self.tamper_after)]
        # the enclave and the worker take turns on the same cores: idle OpenMP threads must
        # sleep, not spin (spinning threads of the waiting side halve the other's speed)
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        deadline = time.monotonic() + self.start_timeout_s
        while not os.path.exists(self.socket_path):
            if self.proc.poll() is not None:
                self.stop()
                raise EnclaveError(f"accelerator worker exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise EnclaveError("accelerator worker did not come up in time")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Kill the worker and remove its socket and shared memory (idempotent)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> AcceleratorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
