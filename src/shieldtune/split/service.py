"""The split server's host process: it owns the enclave and the gRPC relay, and never decrypts.

    client --gRPC (sealed records)--> host: RelayServer --pipe (sealed records)--> enclave
                                                                 split-server program

The host starts the ``split-server`` enclave program with a config that is part of its
measurement (:func:`program_config`), serves the relay on loopback by default, and can seal the
enclave's state (the server adapter and optimiser) to disk; it holds no channel key, so it sees
only the public handshake messages and ciphertext. :func:`connect` is the client's side: verify
the quote against a policy (measurement allow-list; simulated enclaves only when
``allow_simulated`` is set), then talk to the enclave through :class:`SplitRemote`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from shieldtune.crypto.framing import MetaValue
from shieldtune.errors import ConfigError
from shieldtune.split.client import SplitRemote
from shieldtune.split.protocol import PROGRAM_NAME
from shieldtune.tee.attestation import Policy, Verifier
from shieldtune.tee.audit import AuditLog
from shieldtune.tee.client import SecureClient
from shieldtune.tee.enclave import Enclave, create_enclave
from shieldtune.tee.program import measure_program
from shieldtune.training.steps import optim_settings
from shieldtune.transport.grpc_client import GrpcTransport
from shieldtune.transport.grpc_server import RelayLimits, RelayServer

__all__ = [
    "SIMULATED_TEE",
    "SplitService",
    "program_config",
    "split_policy",
    "connect",
]

log = logging.getLogger("shieldtune.split")

#: How a simulated server enclave is labelled in logs and run summaries.
SIMULATED_TEE = "simulated (no hardware protection)"


def program_config(
    *,
    model: str,
    task: str,
    num_labels: int | None,
    cut: int,
    adapter: Mapping[str, Any],
    lr: float,
    train: Any,
    seed: int,
    total_steps: int,
    wire_dtype: str = "float32",
    allow_export: bool = False,
    max_tokens: int = 1 << 20,
    server_adapter: str = "shared",
) -> dict[str, MetaValue]:
    """The ``split-server`` config (measured: clients verify exactly these settings).

    Args:
        model: Preset or local folder.
        task: ``seq-cls`` or ``causal-lm``.
        num_labels: Classes (seq-cls), else None.
        cut: Layers the client runs.
        adapter: Back-slice adapter ``{method, **options}``.
        lr: Peak learning rate of the back adapter.
        train: A ``TrainConfig`` (weight decay, clip, schedule, warm-up, precision).
        seed: Run seed.
        total_steps: Steps of the run (LR schedule).
        wire_dtype: ``float32`` or ``bfloat16``.
        allow_export: Whether ``export_adapter`` may return the adapter to a client.
        max_tokens: Most B·T per request.
        server_adapter: ``shared`` (one adapter for every client) or ``per_client`` (one per
            session, averaged by the host's ``average`` call).
    """
    return {
        "model": model,
        "task": task,
        "num_labels": num_labels,
        "cut": cut,
        "adapter": json.dumps(dict(adapter), sort_keys=True),
        "lr": float(lr),
        **optim_settings(train),
        "seed": int(seed),
        "total_steps": int(total_steps),
        "precision": str(train.precision),
        "wire_dtype": wire_dtype,
        "allow_export": bool(allow_export),
        "max_tokens": int(max_tokens),
        "server_adapter": server_adapter,
    }


class SplitService:
    """Enclave (``split-server``) + gRPC relay, as one host-side object.

    Args:
        config: The program config (:func:`program_config`).
        backend: Enclave backend (``simulated`` on machines without TEE hardware).
        host: Interface of the relay (loopback by default).
        port: Port of the relay (0: a free one).
        audit: Boundary audit log of the enclave, if any.
        platform_key: Platform secret file of the simulated backend (tests).
        memory_budget_mb: Enclave budget for its tensors plus the message in flight.
        limits: Relay limits (message size, idle / handshake timeouts, sessions).
        threads: CPU threads of the enclave (default: this process's torch threads).
        interceptors: gRPC server interceptors.
        tls: ``(certificate PEM, private key PEM)`` of the relay's port; None: plaintext gRPC
            (the records are sealed end to end either way).
    """

    def __init__(
        self,
        config: Mapping[str, MetaValue],
        *,
        backend: str = "simulated",
        host: str = "127.0.0.1",
        port: int = 0,
        audit: AuditLog | None = None,
        platform_key: Path | None = None,
        memory_budget_mb: float = 1024.0,
        limits: RelayLimits | None = None,
        threads: int | None = None,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
        tls: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.config = dict(config)
        self.limits = limits or RelayLimits()
        kwargs: dict[str, Any] = {
            "memory_budget_mb": memory_budget_mb,
            "max_message_mb": self.limits.max_message_bytes / 2**20 + 1.0,
            "audit": audit,
        }
        if platform_key is not None:
            kwargs["platform_key"] = platform_key
        self.enclave: Enclave = create_enclave(backend, PROGRAM_NAME, self.config, **kwargs)
        self.relay = RelayServer(
            self.enclave,
            host=host,
            port=port,
            limits=self.limits,
            interceptors=interceptors,
            tls=tls,
        )
        self.threads = threads

    @property
    def measurement(self) -> str:
        """The enclave's measurement (code + config)."""
        return self.enclave.measurement

    @property
    def simulated(self) -> bool:
        """Whether the enclave is a simulation (no hardware protection)."""
        return self.enclave.simulated

    @property
    def tee(self) -> str:
        """Human label of the TEE, ``simulated (no hardware protection)`` for the simulation."""
        platform = getattr(self.enclave, "platform", None)
        return SIMULATED_TEE if self.simulated else str(getattr(platform, "name", "hardware"))

    @property
    def platform_public_key(self) -> str | None:
        """Hex Ed25519 key of the simulated platform (what a client's policy trusts)."""
        platform = getattr(self.enclave, "platform", None)
        return getattr(platform, "public_key_hex", None)

    @property
    def address(self) -> str:
        """``host:port`` of the relay."""
        return self.relay.address

    def start(self) -> SplitService:
        """Start the enclave, then the relay."""
        threads = str(self.threads or _torch_threads())
        saved = os.environ.get("SHIELDTUNE_ENCLAVE_THREADS")
        os.environ["SHIELDTUNE_ENCLAVE_THREADS"] = threads  # read once, at launch
        try:
            self.enclave.start()
        finally:
            if saved is None:
                os.environ.pop("SHIELDTUNE_ENCLAVE_THREADS", None)
            else:
                os.environ["SHIELDTUNE_ENCLAVE_THREADS"] = saved
        if self.simulated:
            log.warning("split server enclave: %s, measurement %s", SIMULATED_TEE, self.measurement)
        try:
            self.relay.start()
        except BaseException:
            self.enclave.stop()
            raise
        return self

    def seal(self, path: Path) -> int:
        """Seal the enclave state (after a client's ``checkpoint``); return the round."""
        return self.enclave.seal(Path(path))

    def unseal(self, path: Path) -> int:
        """Restore sealed state into the enclave (before a client's ``init``); return the round."""
        return self.enclave.unseal(Path(path))

    def stop(self) -> None:
        """Stop the relay, then the enclave (idempotent)."""
        try:
            self.relay.stop()
        finally:
            self.enclave.stop()

    def __enter__(self) -> SplitService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def split_policy(
    config: Mapping[str, MetaValue],
    *,
    allow_simulated: bool = False,
    simulated_platform_keys: Sequence[str] = (),
) -> Policy:
    """The client's policy: exactly the ``split-server`` build with this config.

    The client computes the measurement from its own copy of the code, so it accepts only an
    enclave running that code with these settings.
    """
    return Policy(
        allowed_measurements=[measure_program(PROGRAM_NAME, config)],
        allow_simulated=allow_simulated,
        simulated_platform_keys=list(simulated_platform_keys),
    )


def connect(
    address: str,
    policy: Policy,
    *,
    wire_dtype: str = "float32",
    max_message_bytes: int = RelayLimits.max_message_bytes,
    root_certificates: bytes | None = None,
    connect_timeout_s: float = 30.0,
) -> tuple[SplitRemote, GrpcTransport]:
    """Connect to a split server over gRPC and verify its enclave before sending anything.

    Args:
        address: ``host:port`` of the relay.
        policy: What the client accepts (:func:`split_policy`).
        wire_dtype: ``float32`` or ``bfloat16``.
        max_message_bytes: Largest gRPC message (match the server's).
        root_certificates: CA PEM of the relay's TLS certificate; None: plaintext gRPC.
        connect_timeout_s: How long the handshake waits for the server to be reachable.

    Returns:
        The server stub and the transport (byte counters, ``close()``).

    Raises:
        AttestationError: The quote fails the policy (e.g. simulated without opt-in).
        ChannelError: The server is unreachable or refused the handshake.
        ConfigError: Unknown wire dtype.
    """
    if wire_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"split.wire_dtype: {wire_dtype!r} unknown; accepted: float32, bfloat16")
    transport = GrpcTransport(
        address,
        max_message_bytes=max_message_bytes,
        connect_timeout_s=connect_timeout_s,
        root_certificates=root_certificates,
    )
    try:
        secure = SecureClient.connect(Verifier(policy), transport.handshake, transport.send)
    except BaseException:
        transport.close()
        raise
    return SplitRemote(secure.call, wire_dtype), transport
