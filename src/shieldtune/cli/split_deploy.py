"""``shieldtune serve`` / ``join`` for ``mode: split``: split fine-tuning across machines.

The server host runs the ``split-server`` enclave and its gRPC relay (``--host`` / ``--port``,
TLS with the ``--certs`` folder of ``shieldtune certs``); each client host verifies the enclave
and trains its front slice against it (``shieldtune join CONFIG --server HOST:PORT``). See
:mod:`shieldtune.recipes.split_deploy` for what each side does and writes.

TLS: the records on the relay are sealed end to end (attested channel, AES-GCM) whether or not
TLS is on; TLS adds confidentiality of the metadata (session tokens, which ECALL a message
carries is sealed anyway) and authenticates the host's port. ``--insecure`` drops it on trusted
test networks.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.panel import Panel
from rich.table import Table

from shieldtune.cli._common import console, progress_bar, quiet_libraries
from shieldtune.cli._flower import (
    check_port_free,
    parse_address,
    sigterm_as_interrupt,
    tls_files,
)
from shieldtune.config import RunConfig
from shieldtune.errors import ConfigError

__all__ = [
    "serve_split_command",
    "join_split_command",
    "check_split_serve",
    "announce_split_rounds",
    "server_report",
]


def _simulated_banner(key: str | None) -> None:
    console.print(
        Panel(
            "split on a SIMULATED enclave: an ordinary process, NO hardware protection "
            "(development and testing only).\n"
            f"simulated platform key: {key}\n"
            f"clients pin it with: shieldtune join ... --trust-platform-key {key}",
            title="SIMULATED ENCLAVE",
            style="bold yellow",
        )
    )


def _server_tls(certs: Path | None, insecure: bool) -> tuple[bytes, bytes] | None:
    if insecure and certs is not None:
        raise ConfigError("--insecure and --certs exclude each other")
    if insecure:
        return None
    cert, key = tls_files(certs, ["server.pem", "server.key"])
    return cert.read_bytes(), key.read_bytes()


def serve_split_command(
    cfg: RunConfig, host: str, port: int, certs: Path | None, insecure: bool
) -> int:
    """Serve the split server until its client has finished; print the summary (one client;
    ``serve_command`` checked the options with :func:`check_split_serve`).

    Returns:
        0, or 130 when interrupted (the run folder is written either way).
    """
    from shieldtune.recipes.split_deploy import serve_split

    tls = _server_tls(certs, insecure)
    check_port_free(host, port)
    quiet_libraries()

    def on_event(kind: str, info: dict) -> None:
        if kind == "listening":
            console.print(f"split server enclave: program split-server, TEE {info['tee']}")
            console.print(f"enclave measurement: {info['measurement']}")
            if info["platform_key"]:
                _simulated_banner(info["platform_key"])
            wire = "TLS" if info["tls"] else "NO TLS (--insecure)"
            console.print(f"split relay listening on {info['address']} ({wire})")
            console.print(f"waiting for {cfg.split.clients} client(s): shieldtune join")
        elif kind == "session":
            style = "green" if info["outcome"] == "finished" else "yellow"
            console.print(
                f"[{style}]client session {info['ended']} {info['outcome']}[/] "
                f"({info['bytes_in']:,} record bytes received so far)"
            )

    with sigterm_as_interrupt():  # SIGTERM as Ctrl-C: stop waiting, seal, write the folder
        run_dir = serve_split(cfg, host=host, port=port, tls=tls, on_event=on_event)
    return server_report(run_dir)


def check_split_serve(
    cfg: RunConfig, port: int, superlink: str | None, resume: Path | None
) -> None:
    """Refuse serve options split does not take, and a simulated enclave without opt-in.

    Raises:
        ConfigError: Every problem found.
    """
    from shieldtune.recipes.split_secure import check_simulated_opt_in

    problems = []
    if superlink is not None:
        problems.append("--superlink: split runs its own relay (and SuperLink); drop the option")
    if resume is not None:
        problems.append("--resume: a split server does not resume yet; start a new run")
    last = 65534 if cfg.split.clients > 1 else 65535  # several clients: SuperLink at port + 1
    if not 0 < port <= last:
        problems.append(f"--port {port} is outside 1..{last}")
    if problems:
        raise ConfigError(problems)
    check_simulated_opt_in(cfg)


def announce_split_rounds(cfg: RunConfig) -> None:
    """Print both enclaves' measurements and, when simulated, the platform key to pin."""
    from shieldtune.federated.deploy import enclave_config, enclave_program
    from shieldtune.recipes.split_rounds import deployed_schedule
    from shieldtune.split.protocol import PROGRAM_NAME
    from shieldtune.tee.backends.simulated import SimulatedPlatform
    from shieldtune.tee.program import measure_program

    program = deployed_schedule(cfg)[2]
    console.print(f"split server enclave: measurement {measure_program(PROGRAM_NAME, program)}")
    aggregation = measure_program(enclave_program(cfg), enclave_config(cfg))
    console.print(f"aggregation enclave ({enclave_program(cfg)}): measurement {aggregation}")
    _simulated_banner(SimulatedPlatform().public_key_hex)


def server_report(run_dir: Path) -> int:
    """Print the server's summary; 130 if it was interrupted, else 0."""
    summary = json.loads((run_dir / "summary.json").read_text())
    table = Table(title=f"split server ({summary['tee']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    keys = ("clients", "rounds", "server_steps", "planned_steps", "client_steps")
    for key in (*keys, "relay_bytes_in", "relay_bytes_out", "accuracy", "loss"):
        value = summary.get(key)
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        elif value is not None:
            table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)
    console.print(f"run folder: [bold]{run_dir}[/] (server state sealed, audit log)")
    if summary.get("interrupted"):
        console.print(
            "[yellow]interrupted[/]: the server state of the committed steps is sealed in the "
            "run folder"
        )
        return 130
    return 0


def join_split_command(
    cfg: RunConfig,
    *,
    server: str,
    client: int,
    certs: Path | None,
    insecure: bool,
    trusted_keys: list[str],
    connect_timeout_s: float,
) -> int:
    """Verify the server enclave, train this client's front slice, write its run folder
    (``split.clients: 1``; ``join_command`` checked the options).

    Returns:
        Exit code 0 (errors are raised as :class:`~shieldtune.errors.ShieldtuneError`).
    """
    from shieldtune.cli.train import print_summary
    from shieldtune.recipes.split_deploy import join_split

    host, port = parse_address(server, "--server")
    if insecure and certs is not None:
        raise ConfigError("--insecure and --certs exclude each other")
    ca = None if insecure else tls_files(certs, ["ca.pem"])[0].read_bytes()
    quiet_libraries()
    wire = "TLS" if ca is not None else "NO TLS (--insecure)"
    console.print(f"split client {client} of {cfg.split.clients}: server {host}:{port} ({wire})")
    if cfg.split.allow_simulated:
        console.print(
            "[bold yellow]accepting a SIMULATED server enclave (no hardware protection)[/]"
        )
    with progress_bar(f"split client · {cfg.model.name}") as update:
        run_dir = join_split(
            cfg,
            address=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            platform_keys=trusted_keys,
            root_certificates=ca,
            connect_timeout_s=connect_timeout_s,
            on_progress=update,
        )
    print_summary(cfg, run_dir)
    return 0
