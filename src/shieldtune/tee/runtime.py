"""The enclave side: runs inside the enclave process and serves the host's messages.

Started as ``python -m shieldtune.tee.runtime`` (simulated, TDX/SEV-SNP) or under Gramine. The
protocol fd pair is the process's original stdin/stdout; stdout is then pointed at stderr so that
prints cannot corrupt the protocol. The first message is ``init``; then each host message gets
exactly one reply: ``{"op": "ok", ...}`` or ``{"op": "error", "type": ..., "message": ...}``.

Operations: ``call`` (an ECALL in the clear or masked), ``channel_open`` / ``channel_call`` /
``channel_close`` (the attested channel's enclave end; the host sees only ciphertext),
``quote``, ``seal`` / ``unseal``, ``memory``, ``shutdown``.
"""

from __future__ import annotations

import importlib
import logging
import os
import resource
import select
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shieldtune.crypto.channel import ChannelSession, ClientHello, enclave_accept
from shieldtune.crypto.framing import (
    Frame,
    FrameLimits,
    MetaValue,
    bytes_to_tensor,
    decode_frame,
    encode_frame,
    tensor_to_bytes,
)
from shieldtune.errors import ChannelError, EnclaveError, SealingError, ShieldtuneError
from shieldtune.tee.heap import HeapTrimmer
from shieldtune.tee.pipe import PipeClosed, read_message, write_message
from shieldtune.tee.program import ENCLAVE_PROGRAMS, EnclaveContext, EnclaveProgram, TrackedState
from shieldtune.tee.sealing import seal_blob, unseal_blob

__all__ = ["Runtime", "main", "error_reply", "MAX_SESSIONS", "RESERVED_META"]

log = logging.getLogger("shieldtune.enclave")
MAX_SESSIONS = 256
#: Metadata keys the protocol uses; ECALL arguments and results may not use them.
RESERVED_META = ("op", "ecall")
_MAX_ERROR_CHARS = 500

#: In-enclave quote providers (closed table): quote_source -> (module, function).
_QUOTERS = {
    "gramine": ("shieldtune.tee.backends.gramine_sgx", "enclave_quote"),
    "tsm": ("shieldtune.tee.backends.tsm", "enclave_quote"),
}


def _tensor_bytes(frame: Frame) -> int:
    return sum(t.numel() * t.element_size() for t in frame.tensors.values())


def error_reply(err: BaseException) -> Frame:
    """The reply frame for an error (ShieldtuneError subclasses keep their class name)."""
    if isinstance(err, ShieldtuneError):
        kind, message = type(err).__name__, str(err)
    else:
        kind, message = "EnclaveError", f"{type(err).__name__}: {err}"
    return Frame(meta={"op": "error", "type": kind, "message": message[:_MAX_ERROR_CHARS]})


class Runtime:
    """State of one enclave process.

    Args:
        init: The host's ``init`` frame.
    """

    def __init__(self, init: Frame) -> None:
        m = init.meta
        name = str(m["program"])
        spec = ENCLAVE_PROGRAMS.get(name, field="program")
        program = getattr(importlib.import_module(spec.module), "PROGRAM", None)
        if not isinstance(program, EnclaveProgram) or program.name != name:
            raise EnclaveError(f"module {spec.module} does not define PROGRAM for {name!r}")
        self.program = program
        self.simulated = bool(m["simulated"])
        self.quote_source = str(m["quote_source"])
        self.attestation_root = str(m.get("attestation_root") or "")
        self.limits = FrameLimits(max_bytes=init.meta_int("max_message_bytes"))
        config = decode_frame(tensor_to_bytes(init.tensors["config"])).meta
        self.ctx = EnclaveContext(
            program=name,
            measurement=str(m["measurement"]),
            config=config,
            state=TrackedState(init.meta_int("budget_bytes")),
            simulated=self.simulated,
            log=log,
        )
        key = init.tensors.get("sealing_key")
        self._sealing_key = tensor_to_bytes(key) if key is not None else None
        self._sealing = str(m["sealing"])
        self.sessions: dict[int, ChannelSession] = {}
        self._next_session = 1
        self._ops: dict[str, Callable[[Frame], Frame]] = {
            "call": self._call,
            "channel_open": self._channel_open,
            "channel_call": self._channel_call,
            "channel_close": self._channel_close,
            "quote": self._quote,
            "seal": self._seal,
            "unseal": self._unseal,
            "memory": self._memory,
        }

    def handle(self, request: Frame) -> Frame:
        """Serve one host message; never raises (errors become error replies)."""
        op = str(request.meta.get("op"))
        handler = self._ops.get(op)
        try:
            if handler is None:
                raise EnclaveError(f"unknown operation {op!r}; accepted: {', '.join(self._ops)}")
            self.ctx.state.reserve(_tensor_bytes(request), f"the {op!r} message")
            reply = handler(request)
            reply.meta.setdefault("op", "ok")
            return reply
        except Exception as err:  # every failure is reported to the host, the enclave lives on
            return error_reply(err)
        finally:
            self.ctx.state.in_flight = 0

    # ------------------------------------------------------------------ ECALLs
    def _run_ecall(self, name: str, request: Frame) -> Frame:
        args = Frame(
            meta={k: v for k, v in request.meta.items() if k not in RESERVED_META},
            tensors=request.tensors,
        )
        reply = self.program.dispatch(self.ctx, name, args)
        if not isinstance(reply, Frame):
            raise EnclaveError(f"ECALL {name!r} returned {type(reply).__name__}, expected Frame")
        clash = [k for k in RESERVED_META if k in reply.meta]
        if clash:
            raise EnclaveError(f"ECALL {name!r} returned reserved metadata keys {clash}")
        return reply

    def _call(self, request: Frame) -> Frame:
        name = str(request.meta.get("ecall"))
        self.program.check_way(name, channel=False)
        return self._run_ecall(name, request)

    # ------------------------------------------------------------------ channel
    def _channel_open(self, request: Frame) -> Frame:
        if len(self.sessions) >= MAX_SESSIONS:
            raise ChannelError(f"enclave already holds {MAX_SESSIONS} sessions; close some")
        hello = ClientHello.from_bytes(tensor_to_bytes(request.tensors["hello"]))
        enclave_public, rd, session = enclave_accept(hello)
        sid = self._next_session
        self._next_session += 1
        self.sessions[sid] = session
        tensors = {
            "enclave_public": bytes_to_tensor(enclave_public),
            "report_data": bytes_to_tensor(rd),
        }
        evidence = self._in_enclave_quote(rd)
        if evidence is not None:
            tensors["evidence"] = bytes_to_tensor(evidence)
        return Frame(meta={"session": sid}, tensors=tensors)

    def _session(self, request: Frame) -> tuple[int, ChannelSession]:
        sid = request.meta_int("session")
        session = self.sessions.get(sid)
        if session is None:
            raise ChannelError(
                f"no open channel session {sid!r} (closed after an error, or never opened)"
            )
        return sid, session

    def _channel_call(self, request: Frame) -> Frame:
        sid, session = self._session(request)
        try:
            plaintext = session.open(tensor_to_bytes(request.tensors["record"]))
        except ChannelError:
            self._forget(sid)  # the session closed itself
            raise
        try:
            inner = decode_frame(plaintext, self.limits)
            name = str(inner.meta.get("ecall"))
            self.program.check_way(name, channel=True)
            self.ctx.session = sid
            try:
                reply = self._run_ecall(name, inner)
            finally:
                self.ctx.session = None
            reply.meta = {"op": "ok", **reply.meta}
            out = encode_frame(reply.meta, reply.tensors, self.limits)
        except Exception as err:  # reported to the client, encrypted; the host learns nothing
            err_frame = error_reply(err)
            out = encode_frame(err_frame.meta)
        return Frame(tensors={"record": bytes_to_tensor(session.seal(out))})

    def _forget(self, sid: int) -> None:
        """Drop a session and let the program forget what it kept for it."""
        del self.sessions[sid]
        try:
            self.program.session_closed(self.ctx, sid)
        except Exception as err:  # noqa: BLE001  (a hook's failure must not keep the session)
            log.warning("closing session %d: %s", sid, err)

    def _channel_close(self, request: Frame) -> Frame:
        sid, _ = self._session(request)
        self._forget(sid)
        return Frame()

    # ------------------------------------------------------------------ quotes
    def _in_enclave_quote(self, report_data: bytes) -> bytes | None:
        if self.quote_source == "host":
            return None
        module, fn = _QUOTERS[self.quote_source]
        quoter: Any = getattr(importlib.import_module(module), fn)
        return bytes(quoter(report_data, self.attestation_root).to_bytes())

    def _quote(self, request: Frame) -> Frame:
        rd = tensor_to_bytes(request.tensors["report_data"])
        if len(rd) != 64:
            raise EnclaveError(f"report data must be 64 bytes, got {len(rd)}")
        evidence = self._in_enclave_quote(rd)
        tensors = {"report_data": bytes_to_tensor(rd)}
        if evidence is not None:
            tensors["evidence"] = bytes_to_tensor(evidence)
        return Frame(tensors=tensors)

    # ------------------------------------------------------------------ sealing
    def _key(self) -> bytes:
        if self._sealing == "provided" and self._sealing_key is not None:
            return self._sealing_key
        if self._sealing == "gramine":
            raw = (
                Path(self.attestation_root or "/dev/attestation") / "keys" / "_sgx_mrenclave"
            ).read_bytes()
            return HKDF(hashes.SHA256(), 32, b"shieldtune-seal-v1", b"gramine").derive(raw)
        raise SealingError(
            "this backend has no sealing key (TDX / SEV-SNP need a key broker); sealing refused"
        )

    def _seal(self, request: Frame) -> Frame:
        round_ = request.meta_int("round")
        plaintext = encode_frame({"program": self.program.name}, dict(self.ctx.state))
        blob = seal_blob(self._key(), self.ctx.measurement, round_, plaintext)
        return Frame(meta={"round": round_}, tensors={"blob": bytes_to_tensor(blob)})

    def _unseal(self, request: Frame) -> Frame:
        expected = request.meta_int("round")
        blob = tensor_to_bytes(request.tensors["blob"])
        state = decode_frame(unseal_blob(self._key(), self.ctx.measurement, expected, blob))
        self.ctx.state.in_flight = 0
        self.ctx.state.clear()
        for name, tensor in state.tensors.items():
            self.ctx.state[name] = tensor
        return Frame(meta={"round": expected, "tensors": len(state.tensors)})

    def _memory(self, request: Frame) -> Frame:
        s = self.ctx.state
        meta: dict[str, MetaValue] = {
            "budget_bytes": s.budget_bytes,
            "state_bytes": s.bytes,
            "peak_bytes": s.peak_bytes,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "sessions": len(self.sessions),
        }
        return Frame(meta=meta)


def _protocol_files() -> tuple[Any, Any]:
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)  # stray prints go to stderr, never into the protocol
    return proto_in, proto_out


def main() -> int:
    """Serve the host until ``shutdown`` or until the host goes away."""
    proto_in, proto_out = _protocol_files()
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="[enclave pid %(process)d] %(levelname)s %(message)s",
    )
    torch.set_num_threads(int(os.environ.get("SHIELDTUNE_ENCLAVE_THREADS", "1")))
    try:
        init = decode_frame(read_message(proto_in, 1 << 24))
        runtime = Runtime(init)
    except Exception as err:
        write_message(proto_out, encode_frame(error_reply(err).meta))
        return 2
    if runtime.simulated:
        log.warning(
            "SIMULATED enclave (no hardware protection): program %r, measurement %s",
            runtime.program.name,
            runtime.ctx.measurement,
        )
    write_message(proto_out, encode_frame({"op": "ok", "pid": os.getpid()}))
    heap = HeapTrimmer()
    while True:
        if heap.pending and not select.select([proto_in], [], [], heap.idle_s)[0]:
            heap.trim()  # idle: hand the freed heap back before waiting for the host
        try:
            raw = read_message(proto_in, runtime.limits.max_bytes + 16)
        except PipeClosed:
            return 0  # the host went away
        try:
            request = decode_frame(raw, runtime.limits)
        except ChannelError as err:
            write_message(proto_out, encode_frame(error_reply(err).meta))
            continue
        if request.meta.get("op") == "shutdown":
            runtime.sessions.clear()
            runtime.ctx.state.clear()
            write_message(proto_out, encode_frame({"op": "ok"}))
            logging.shutdown()
            os._exit(0)  # skip the interpreter's slow teardown (torch); nothing is left to flush
        reply = runtime.handle(request)
        try:
            data = encode_frame(reply.meta, reply.tensors, runtime.limits)
        except ChannelError as err:  # e.g. an ECALL returned an unsupported dtype
            data = encode_frame(error_reply(err).meta)
        write_message(proto_out, data)
        heap.served()


if __name__ == "__main__":
    sys.exit(main())
