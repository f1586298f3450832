"""Enclave programs: a closed table of named ECALLs, their state, and their measurement.

An enclave program is a module of the project that defines ``PROGRAM = EnclaveProgram(name)``
and registers its ECALLs with ``@PROGRAM.ecall("name")``. Each ECALL takes the
:class:`EnclaveContext` and the request :class:`~shieldtune.crypto.framing.Frame`, and returns a
response frame. An ECALL may be reachable from the host in the clear, through a client's attested
channel (then ``ctx.session`` names that channel session), or both; the runtime refuses the
other way in. ``@PROGRAM.on_close`` registers what to forget when a channel session closes.
The host resolves programs by name through :data:`ENCLAVE_PROGRAMS` (never by a dotted path
taken from a config).

Measurement (simulated backend) = SHA-256 over the source of every module the enclave process
runs (the runtime, framing, channel, sealing, this file, the program, the modules it declares and
their package ``__init__`` files) and the canonical JSON of its config.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch

from shieldtune.crypto.framing import Frame, MetaValue
from shieldtune.errors import EnclaveError
from shieldtune.registry import Registry

__all__ = [
    "Ecall",
    "EnclaveProgram",
    "EnclaveContext",
    "TrackedState",
    "ProgramSpec",
    "ENCLAVE_PROGRAMS",
    "RUNTIME_MODULES",
    "measure_program",
    "measured_modules",
    "canonical_config",
    "loaded_modules",
]

Ecall = Callable[["EnclaveContext", Frame], Frame]
SessionHook = Callable[["EnclaveContext", int], None]

#: Modules every enclave process runs: part of every measurement.
RUNTIME_MODULES: tuple[str, ...] = (
    "shieldtune.errors",
    "shieldtune.registry",
    "shieldtune.crypto.framing",
    "shieldtune.crypto.channel",
    "shieldtune.tee.sealing",
    "shieldtune.tee.program",
    "shieldtune.tee.heap",
    "shieldtune.tee.pipe",
    "shieldtune.tee.runtime",
)


class EnclaveProgram:
    """A named, closed table of ECALLs.

    Args:
        name: Program name (as registered in :data:`ENCLAVE_PROGRAMS`).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.ecalls: dict[str, Ecall] = {}
        self.ways: dict[str, tuple[bool, bool]] = {}  # name -> (from the host, over a channel)
        self.closed_hooks: list[SessionHook] = []

    def ecall(
        self, name: str, *, host: bool = True, channel: bool = True
    ) -> Callable[[Ecall], Ecall]:
        """Decorator registering an ECALL under ``name`` (names starting with "_" are reserved).

        Args:
            name: The ECALL's name.
            host: Whether the host may call it in the clear.
            channel: Whether a client may call it through the attested channel.
        """

        def register(fn: Ecall) -> Ecall:
            if not name or name.startswith("_") or name in self.ecalls or not (host or channel):
                raise ValueError(
                    f"ECALL name {name!r} is reserved, empty, already registered or unreachable"
                )
            self.ecalls[name] = fn
            self.ways[name] = (host, channel)
            return fn

        return register

    def on_close(self, fn: SessionHook) -> SessionHook:
        """Decorator: ``fn(ctx, session)`` runs when a channel session closes (or is dropped)."""
        self.closed_hooks.append(fn)
        return fn

    def check_way(self, name: str, *, channel: bool) -> None:
        """Refuse an ECALL reached the way it does not allow (unknown names pass to dispatch).

        Raises:
            EnclaveError: Naming the ECALL and the only way in.
        """
        host_ok, channel_ok = self.ways.get(name, (True, True))
        if channel and not channel_ok:
            raise EnclaveError(f"ECALL {name!r} is reserved for the host; a client cannot call it")
        if not channel and not host_ok:
            raise EnclaveError(
                f"ECALL {name!r} is reachable only through a client's attested channel, not "
                "from the host"
            )

    def session_closed(self, ctx: EnclaveContext, session: int) -> None:
        """Run the ``on_close`` hooks for ``session``."""
        for fn in self.closed_hooks:
            fn(ctx, session)

    def dispatch(self, ctx: EnclaveContext, name: str, request: Frame) -> Frame:
        """Run ECALL ``name``.

        Raises:
            EnclaveError: Unknown ECALL (the message lists the accepted ones).
        """
        fn = self.ecalls.get(name)
        if fn is None:
            raise EnclaveError(
                f"enclave program {self.name!r} has no ECALL {name!r}; accepted: "
                f"{', '.join(sorted(self.ecalls))}"
            )
        return fn(ctx, request)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class TrackedState(MutableMapping[str, torch.Tensor]):
    """Enclave-resident tensors, counted against the enclave memory budget.

    Args:
        budget_bytes: Most bytes the state plus the message in flight may use.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._items: dict[str, torch.Tensor] = {}
        self.bytes = 0
        self.peak_bytes = 0
        self.in_flight = 0

    def reserve(self, nbytes: int, what: str) -> None:
        """Account for a message of ``nbytes`` being processed.

        Raises:
            EnclaveError: The budget would be exceeded.
        """
        self._check(self.bytes + nbytes, what)
        self.in_flight = nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes + nbytes)

    def _check(self, total: int, what: str) -> None:
        if total > self.budget_bytes:
            raise EnclaveError(
                f"enclave memory budget exceeded by {what}: would use {total} bytes of "
                f"{self.budget_bytes}; raise memory_budget_mb or send smaller tensors"
            )

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        if not isinstance(value, torch.Tensor):
            raise EnclaveError(f"enclave state {key!r} must be a tensor")
        old = _nbytes(self._items[key]) if key in self._items else 0
        total = self.bytes - old + _nbytes(value)
        self._check(total + self.in_flight, f"storing {key!r}")
        self._items[key] = value
        self.bytes = total
        self.peak_bytes = max(self.peak_bytes, total + self.in_flight)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._items[key]

    def __delitem__(self, key: str) -> None:
        self.bytes -= _nbytes(self._items.pop(key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class EnclaveContext:
    """What an ECALL sees.

    Attributes:
        program: The program's name.
        measurement: The enclave's measurement (hex).
        config: The program's config.
        state: Enclave-resident tensors (sealed by ``Enclave.seal``), budget-tracked.
        simulated: True in the simulated backend.
        log: Logger for enclave-side messages.
        session: The channel session of the ECALL in progress (None: a host call).
    """

    program: str
    measurement: str
    config: dict[str, MetaValue]
    state: TrackedState
    simulated: bool
    log: logging.Logger
    session: int | None = None


@dataclass(frozen=True)
class ProgramSpec:
    """Where a program lives and which extra modules it trusts (all measured)."""

    module: str
    extra_modules: tuple[str, ...] = ()


#: Closed table of enclave programs: name -> module that defines ``PROGRAM``.
ENCLAVE_PROGRAMS: Registry[ProgramSpec] = Registry("enclave program")
ENCLAVE_PROGRAMS.register("echo", ProgramSpec("shieldtune.tee.programs.echo"))
_MODEL_AND_TRAINING = (
    "shieldtune.adapters.base",
    "shieldtune.adapters.full.config",
    "shieldtune.adapters.full.model",
    "shieldtune.adapters.lora.config",
    "shieldtune.adapters.lora.model",
    "shieldtune.adapters.prefix.config",
    "shieldtune.adapters.prefix.model",
    "shieldtune.adapters.spf.adapter",
    "shieldtune.adapters.spf.config",
    "shieldtune.adapters.spf.layer",
    "shieldtune.adapters.spf.model",
    "shieldtune.adapters.spf.saliency",
    "shieldtune.data.builtin",
    "shieldtune.data.metrics",
    "shieldtune.data.splits",
    "shieldtune.data.tables",
    "shieldtune.data.tasks",
    "shieldtune.models.families.base",
    "shieldtune.models.families.bert",
    "shieldtune.models.families.gpt2",
    "shieldtune.models.families.llama",
    "shieldtune.models.masks",
    "shieldtune.models.presets",
    "shieldtune.models.slicing",
    "shieldtune.models.smollm2",
    "shieldtune.models.tokenizers",
    "shieldtune.training.evaluate",
    "shieldtune.training.loop",
    "shieldtune.training.losses",
    "shieldtune.training.rng",
    "shieldtune.training.rundir",
    "shieldtune.training.steps",
)
ENCLAVE_PROGRAMS.register(
    "split-server",
    ProgramSpec(
        "shieldtune.split.server_program",
        (
            *_MODEL_AND_TRAINING,
            "shieldtune.split.protocol",
            "shieldtune.split.server",
            "shieldtune.split.step",
        ),
    ),
)
ENCLAVE_PROGRAMS.register(
    "shielded-party",
    ProgramSpec(
        "shieldtune.shielded.program",
        (
            *_MODEL_AND_TRAINING,
            "shieldtune.shielded.engine",
            "shieldtune.shielded.field",
            "shieldtune.shielded.freivalds",
            "shieldtune.shielded.gemm",
            "shieldtune.shielded.kernels",
            "shieldtune.shielded.linear",
            "shieldtune.shielded.masks",
            "shieldtune.shielded.pool",
            "shieldtune.shielded.worker",
            "shieldtune.tee.endpoint",
            "shieldtune.tee.attestation",
            "shieldtune.tee.audit",
            "shieldtune.tee.dcap",
            "shieldtune.tee.enclave",
            "shieldtune.tee.evidence",
            "shieldtune.tee.simquote",
            "shieldtune.tee.snp",
        ),
    ),
)
_FEDAVG = ("shieldtune.federated.aggregate", "shieldtune.federated.dp")
ENCLAVE_PROGRAMS.register("fedavg", ProgramSpec("shieldtune.federated.enclave_program", _FEDAVG))
ENCLAVE_PROGRAMS.register(
    "fedavg-sparse",
    ProgramSpec(
        "shieldtune.federated.sparse_program",
        # sparse (SPF) updates load the SPF delta code, and with it the adapter package
        ("shieldtune.federated.enclave_program", *_FEDAVG, *_MODEL_AND_TRAINING),
    ),
)


def _module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise EnclaveError(f"enclave module {module!r} cannot be found")
    return Path(spec.origin)


def loaded_modules() -> list[MetaValue]:
    """Project modules this process has loaded (in an enclave: all must be measured)."""
    import sys

    return [m for m in sorted(sys.modules) if m == "shieldtune" or m.startswith("shieldtune.")]


def canonical_config(config: Mapping[str, MetaValue]) -> bytes:
    """Canonical JSON of a program config (sorted keys, no spaces)."""
    return json.dumps(dict(config), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def measured_modules(name: str) -> list[str]:
    """Modules whose source enters the measurement of program ``name``, sorted.

    The runtime's modules, the program's module and its declared extra modules, and every parent
    package (their ``__init__`` files run in the enclave too).

    Raises:
        ConfigError: Unknown program name.
    """
    spec = ENCLAVE_PROGRAMS.get(name, field="program")
    named = {*RUNTIME_MODULES, spec.module, *spec.extra_modules}
    parents = {m.rsplit(".", i)[0] for m in named for i in range(1, m.count(".") + 1)}
    return sorted(named | parents)


def measure_program(name: str, config: Mapping[str, MetaValue]) -> str:
    """SHA-256 (hex) of the program's trusted code and its config.

    Args:
        name: Registered program name.
        config: The program's config.

    Returns:
        64 hex characters.

    Raises:
        ConfigError: Unknown program name.
        EnclaveError: A module file cannot be found.
    """
    h = hashlib.sha256(b"shieldtune-measurement-v1\0")
    for module in measured_modules(name):
        code = _module_file(module).read_bytes()
        h.update(module.encode() + b"\0" + len(code).to_bytes(8, "big") + code)
    cfg = canonical_config(config)
    h.update(b"config\0" + len(cfg).to_bytes(8, "big") + cfg)
    return h.hexdigest()
