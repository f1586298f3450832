"""``ProcessEnclave``: an enclave program in its own OS process, reached over a pipe.

The host sends typed frames (:mod:`shieldtune.crypto.framing`, never pickle) to the runtime
(:mod:`shieldtune.tee.runtime`) through the child's stdin/stdout and reads one reply per message.
A crash or kill mid-call, a timeout and a refused call each raise a clear error. Every message is
recorded in the optional :class:`~shieldtune.tee.audit.AuditLog`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch

from shieldtune.crypto.channel import ClientHello, ServerHello
from shieldtune.crypto.framing import (
    Frame,
    FrameLimits,
    MetaValue,
    bytes_to_tensor,
    decode_frame,
    encode_frame,
    tensor_to_bytes,
)
from shieldtune.errors import EnclaveError, SealingError
from shieldtune.tee.attestation import Evidence
from shieldtune.tee.audit import AuditLog, Protection, TensorInfo
from shieldtune.tee.enclave import Enclave, MemoryReport, Platform, raise_error_frame
from shieldtune.tee.pipe import PipeClosed, Reader, Writer, read_message, write_message
from shieldtune.tee.sealing import blob_round, write_atomic
from shieldtune.tee.simquote import SIMULATED_LABEL

__all__ = ["ProcessEnclave"]

log = logging.getLogger("shieldtune.tee")
_RESERVED = ("op", "ecall")


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _tensor_infos(tensors: Mapping[str, torch.Tensor]) -> tuple[TensorInfo, ...]:
    return tuple(
        TensorInfo(n, str(t.dtype).removeprefix("torch."), tuple(t.shape))
        for n, t in tensors.items()
    )


class ProcessEnclave(Enclave):
    """An enclave program in its own OS process, launched and attested by a :class:`Platform`.

    Args:
        program: Registered enclave program name.
        config: The program's config (part of the measurement).
        platform: Launch / measurement / quoting / sealing policy of the backend.
        memory_budget_mb: Budget for enclave-resident tensors plus the message in flight.
        max_message_mb: Largest message either side accepts.
        audit: Records every boundary crossing, if given.
        call_timeout_s: Default time limit of one call; the enclave is killed when it is exceeded.
        start_timeout_s: Time limit for the process to come up.
    """

    def __init__(
        self,
        program: str,
        config: Mapping[str, MetaValue] | None = None,
        *,
        platform: Platform,
        memory_budget_mb: float = 64.0,
        max_message_mb: float = 256.0,
        audit: AuditLog | None = None,
        call_timeout_s: float = 300.0,
        start_timeout_s: float = 120.0,
    ) -> None:
        self.program = program
        self.config = dict(config or {})
        self.platform = platform
        self.simulated = platform.simulated
        self.budget_bytes = int(memory_budget_mb * 2**20)
        self.limits = FrameLimits(max_bytes=int(max_message_mb * 2**20))
        self.audit = audit
        self.call_timeout_s = call_timeout_s
        self.start_timeout_s = start_timeout_s
        self.measurement = platform.measurement(program, self.config)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def pid(self) -> int | None:
        """The enclave process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        """Whether the enclave process is running."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> ProcessEnclave:
        """Launch the enclave process and send it its program, config and keys.

        Raises:
            EnclaveError: Already running, or the process failed to come up.
        """
        if self.alive:
            raise EnclaveError(f"enclave {self.program!r} is already running (pid {self.pid})")
        if self.simulated:
            log.warning(
                "starting %s: program %r, measurement %s",
                SIMULATED_LABEL,
                self.program,
                self.measurement,
            )
        self._proc = subprocess.Popen(
            self.platform.command(self.program),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_enclave_env(),
            close_fds=True,
            bufsize=0,
        )
        self._finalizer = weakref.finalize(self, _kill, self._proc)
        meta: dict[str, MetaValue] = {
            "op": "init",
            "program": self.program,
            "measurement": self.measurement,
            "budget_bytes": self.budget_bytes,
            "max_message_bytes": self.limits.max_bytes,
            "simulated": self.simulated,
            "quote_source": self.platform.quote_source,
            "sealing": self.platform.sealing,
            "attestation_root": self.platform.attestation_root,
        }
        tensors = {"config": bytes_to_tensor(encode_frame(self.config))}
        key = (
            self.platform.sealing_key(self.measurement)
            if self.platform.sealing == "provided"
            else None
        )
        if key is not None:
            tensors["sealing_key"] = bytes_to_tensor(key)
        try:
            self._exchange(meta, tensors, "init", "clear", self.start_timeout_s)
        except EnclaveError:
            self._reap()
            raise
        log.info("enclave %r up (pid %s, backend %s)", self.program, self.pid, self.platform.name)
        return self

    def stop(self) -> None:
        """Ask the enclave to shut down; kill it after 5 s. Safe to call twice."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                self._exchange({"op": "shutdown"}, {}, "shutdown", "clear", 5.0)
            except EnclaveError:
                pass
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                _kill(proc)
        self._reap()

    def _reap(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _kill(proc)
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()
        if self._finalizer is not None:
            self._finalizer.detach()

    # ------------------------------------------------------------------ pipe
    def _died(self, label: str) -> EnclaveError:
        proc = self._proc
        rc = None
        if proc is not None:
            try:
                rc = proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                rc = None
        how = f"exit code {rc}" if rc is None or rc >= 0 else f"killed by signal {-rc}"
        self._reap()
        return EnclaveError(
            f"enclave {self.program!r} died during {label!r} ({how}); its in-memory state is "
            "lost: start it again and unseal the last sealed state"
        )

    def _exchange(
        self,
        meta: Mapping[str, MetaValue],
        tensors: Mapping[str, torch.Tensor],
        label: str,
        protection: Protection,
        timeout: float | None,
    ) -> Frame:
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                if proc is not None:
                    raise self._died(label)
                raise EnclaveError(f"enclave {self.program!r} is not running; call start() first")
            data = encode_frame(meta, tensors, self.limits)
            self._record("host->enclave", label, len(data), protection, tensors)
            assert proc.stdin is not None and proc.stdout is not None
            try:
                write_message(cast(Writer, proc.stdin), data)
                raw = read_message(cast(Reader, proc.stdout), self.limits.max_bytes + 16, timeout)
            except PipeClosed:
                raise self._died(label) from None
            except TimeoutError:
                self._reap()
                raise EnclaveError(
                    f"enclave {self.program!r} did not answer {label!r} within {timeout} s and "
                    "was killed"
                ) from None
            reply = decode_frame(raw, self.limits)
            self._record("enclave->host", label, len(raw), protection, reply.tensors)
        raise_error_frame(reply, f"enclave {self.program!r} refused {label!r}")
        reply.meta.pop("op", None)
        return reply

    def _record(
        self,
        direction: Any,
        label: str,
        nbytes: int,
        protection: Protection,
        tensors: Mapping[str, torch.Tensor],
    ) -> None:
        if self.audit is not None:
            self.audit.record(
                enclave=self.program,
                direction=direction,
                call=label,
                nbytes=nbytes,
                protection=protection,
                tensors=_tensor_infos(tensors),
            )

    # ------------------------------------------------------------------ calls
    def call(
        self,
        ecall: str,
        meta: Mapping[str, MetaValue] | None = None,
        tensors: Mapping[str, torch.Tensor] | None = None,
        *,
        protection: Protection = "clear",
        timeout: float | None = None,
    ) -> Frame:
        """Run ECALL ``ecall`` in the enclave.

        Args:
            ecall: Name registered by the enclave program.
            meta: Small arguments (not the reserved keys ``op`` / ``ecall``).
            tensors: Tensor arguments.
            protection: What the arguments and result are on the wire: ``clear``, or ``masked``
                if the caller one-time-pad masked them (recorded in the audit log).
            timeout: Seconds before the enclave is declared hung and killed.

        Returns:
            The ECALL's result frame.

        Raises:
            EnclaveError: Unknown ECALL, the ECALL failed, budget exceeded, or the enclave died.
        """
        meta = dict(meta or {})
        clash = [k for k in _RESERVED if k in meta]
        if clash:
            raise EnclaveError(f"ECALL arguments may not use reserved keys {clash}")
        return self._exchange(
            {"op": "call", "ecall": ecall, **meta},
            dict(tensors or {}),
            ecall,
            protection,
            self.call_timeout_s if timeout is None else timeout,
        )

    def open_channel(self, hello: bytes) -> tuple[int, bytes]:
        """Relay a client hello into the enclave; return ``(session, server hello bytes)``.

        The enclave generates its key pair and report data; the evidence comes from inside the
        enclave (TDX / SEV-SNP / SGX) or from the platform (simulated).
        """
        parsed = ClientHello.from_bytes(hello)
        reply = self._exchange(
            {"op": "channel_open"},
            {"hello": bytes_to_tensor(hello)},
            "channel_open",
            "clear",
            self.call_timeout_s,
        )
        rd = tensor_to_bytes(reply.tensors["report_data"])
        if "evidence" in reply.tensors:
            inner = Evidence.from_json(tensor_to_bytes(reply.tensors["evidence"]))
            evidence = self.platform.complete_evidence(inner)
        else:
            evidence = self.platform.host_quote(self.measurement, rd, parsed.nonce, self.program)
        enclave_public = tensor_to_bytes(reply.tensors["enclave_public"])
        server_hello = ServerHello(enclave_public, evidence.to_bytes())
        return reply.meta_int("session"), server_hello.to_bytes()

    def relay(self, session: int, record: bytes) -> bytes:
        """Relay one encrypted record; the host sees ciphertext only.

        Raises:
            ChannelError: The enclave refused the record (tampered, replayed, reordered); that
                session is closed, the others keep working.
        """
        reply = self._exchange(
            {"op": "channel_call", "session": session},
            {"record": bytes_to_tensor(record)},
            "channel_call",
            "encrypted",
            self.call_timeout_s,
        )
        return tensor_to_bytes(reply.tensors["record"])

    def close_channel(self, session: int) -> None:
        """Forget a channel session inside the enclave."""
        self._exchange(
            {"op": "channel_close", "session": session},
            {},
            "channel_close",
            "clear",
            self.call_timeout_s,
        )

    def quote(self, report_data: bytes, nonce: bytes = b"") -> Evidence:
        """Evidence for ``report_data`` (64 bytes), from the enclave or its platform."""
        reply = self._exchange(
            {"op": "quote"},
            {"report_data": bytes_to_tensor(report_data)},
            "quote",
            "clear",
            self.call_timeout_s,
        )
        if "evidence" in reply.tensors:
            inner = Evidence.from_json(tensor_to_bytes(reply.tensors["evidence"]))
            return self.platform.complete_evidence(inner)
        return self.platform.host_quote(self.measurement, report_data, nonce, self.program)

    # ------------------------------------------------------------------ sealing
    def seal(self, path: Path) -> int:
        """Seal the enclave state into ``path`` (atomic write) at the next counter round.

        Returns:
            The round sealed.

        Raises:
            SealingError: The backend cannot seal, or the counter refuses.
        """
        path = Path(path)
        counter = self.platform.counter(self.measurement, path)
        round_ = counter.current() + 1
        reply = self._exchange(
            {"op": "seal", "round": round_}, {}, "seal", "encrypted", self.call_timeout_s
        )
        write_atomic(path, tensor_to_bytes(reply.tensors["blob"]))
        counter.advance(round_)
        return round_

    def unseal(self, path: Path) -> int:
        """Replace the enclave state with the sealed state in ``path``.

        Returns:
            The round restored.

        Raises:
            SealingError: Missing file, another measurement, tampering, or a rolled-back copy.
        """
        path = Path(path)
        try:
            blob = path.read_bytes()
        except OSError as err:
            raise SealingError(f"cannot read sealed state {path}: {err.strerror}") from None
        blob_round(blob)  # refuse non-blobs before crossing
        expected = self.platform.counter(self.measurement, path).current()
        self._exchange(
            {"op": "unseal", "round": expected},
            {"blob": bytes_to_tensor(blob)},
            "unseal",
            "encrypted",
            self.call_timeout_s,
        )
        return expected

    def memory(self) -> MemoryReport:
        """Budget and use of enclave memory."""
        reply = self._exchange({"op": "memory"}, {}, "memory", "clear", self.call_timeout_s)
        return MemoryReport(**{k: reply.meta_int(k) for k in MemoryReport.__dataclass_fields__})


def _enclave_env() -> dict[str, str]:
    """A minimal environment: the package path, no host secrets (e.g. the platform key path)."""
    src = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": src, "PYTHONDONTWRITEBYTECODE": "1"}
    for name in (
        "PATH",
        "LANG",
        "LC_ALL",
        "TMPDIR",
        "SHIELDTUNE_ENCLAVE_THREADS",
        "OMP_WAIT_POLICY",
    ):
        if name in os.environ:
            env[name] = os.environ[name]
    return env
