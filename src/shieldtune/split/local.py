"""plain-split's server for several clients: the ``split-server`` program in this process.

The same ECALLs, request checks and per-session state as inside the enclave
(:mod:`shieldtune.split.server_program`), with the protection removed: no enclave process, no
attested channel, no sealing; tensors are handed over in memory. Each :meth:`connect` opens one
session (as one attested channel does in ``split``), and calls are served one at a time, as
the enclave serves them::

    with LocalSplitServer(program_config(...)) as server:
        remote, close = server.connect()     # a SplitRemote, as split's connect() returns
        remote.init(); ...; close()
        server.call("average")               # the host's calls, as on the enclave

The program keeps its server object in a module global (one enclave process, one instance), so
one in-process server can be live at a time. Like an enclave process, it keeps its seeding of
the global generators (``init`` seeds them) to itself: each call restores the caller's.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from shieldtune.crypto.framing import Frame, MetaValue
from shieldtune.errors import EnclaveError
from shieldtune.split import server_program
from shieldtune.split.client import SplitRemote
from shieldtune.split.protocol import PROGRAM_NAME
from shieldtune.tee.program import EnclaveContext, TrackedState
from shieldtune.training.rng import GLOBAL_RNG_LOCK

__all__ = ["LocalSplitServer"]

log = logging.getLogger("shieldtune.split")
_LIVE = threading.Lock()


class LocalSplitServer:
    """The ``split-server`` program in this process, serving sessions one call at a time.

    Args:
        config: The program config (:func:`~shieldtune.split.service.program_config`).
    """

    def __init__(self, config: Mapping[str, MetaValue]) -> None:
        self.ctx = EnclaveContext(
            program=PROGRAM_NAME,
            measurement="",
            config=dict(config),
            state=TrackedState(1 << 62),
            simulated=False,
            log=log,
        )
        self._lock = threading.Lock()
        self._sessions: set[int] = set()
        self._next = 1
        self._live = False

    def start(self) -> LocalSplitServer:
        """Own the program's instance slot in this process.

        Raises:
            EnclaveError: Another in-process split server is live.
        """
        with _LIVE:
            if server_program._SERVER:  # noqa: SLF001
                raise EnclaveError("another in-process split server is live; stop it first")
            self._live = True
        return self

    def call(
        self,
        ecall: str,
        meta: Mapping[str, MetaValue] | None = None,
        tensors: Mapping[str, torch.Tensor] | None = None,
        *,
        session: int | None = None,
    ) -> Frame:
        """Run an ECALL for ``session`` (None: the host), one call at a time.

        Raises:
            EnclaveError: The ECALL is not reachable this way, or the program refused it.
            ChannelError: A malformed request.
        """
        with self._lock, GLOBAL_RNG_LOCK:
            server_program.PROGRAM.check_way(ecall, channel=session is not None)
            self.ctx.session = session
            # the enclave process has its own global generators (init seeds them): so here
            saved = random.getstate(), torch.get_rng_state()
            try:
                request = Frame(meta=dict(meta or {}), tensors=dict(tensors or {}))
                with torch.enable_grad():  # as in the enclave process, whatever the caller's mode
                    return server_program.PROGRAM.dispatch(self.ctx, ecall, request)
            finally:
                self.ctx.session = None
                random.setstate(saved[0])
                torch.set_rng_state(saved[1])

    def connect(self, wire_dtype: str = "float32") -> tuple[SplitRemote, Callable[[], None]]:
        """A new session: its stub and the function that closes it."""
        with self._lock:
            sid, self._next = self._next, self._next + 1
            self._sessions.add(sid)

        def call(
            ecall: str,
            meta: Mapping[str, MetaValue] | None,
            tensors: Mapping[str, torch.Tensor] | None,
        ) -> Frame:
            return self.call(ecall, meta, tensors, session=sid)

        return SplitRemote(call, wire_dtype), lambda: self.close(sid)

    def close(self, session: int) -> None:
        """Close a session: the program forgets its staged steps (and per_client adapter)."""
        with self._lock:
            if session in self._sessions:
                self._sessions.remove(session)
                server_program.PROGRAM.session_closed(self.ctx, session)

    def save_adapter(self, out_dir: Path, *, base_model: str) -> None:
        """Write the server adapter (per_client: the last average) in the clear, PEFT format."""
        with self._lock:
            server = server_program._SERVER["server"]  # noqa: SLF001
            if server.per_client:
                server.park()
            server.adapter.save(Path(out_dir), base_model=base_model)

    def stop(self) -> None:
        """Close every session and free the instance slot (idempotent)."""
        for sid in sorted(self._sessions):
            self.close(sid)
        with _LIVE:
            if self._live:
                server_program._SERVER.clear()  # noqa: SLF001
                self._live = False

    def __enter__(self) -> LocalSplitServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
