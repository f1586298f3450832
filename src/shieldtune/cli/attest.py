"""``shieldtune attest``: print enclave program measurements, verify a quote file against a policy.

Examples::

    shieldtune attest --show-measurements
    shieldtune attest evidence.json --policy policy.yaml
    shieldtune attest tdx_quote --policy tdx.yaml --at 2025-07-01T00:00:00Z

A quote file is either evidence JSON (``Evidence.to_json``: simulated, SGX / TDX DCAP with
collateral, SEV-SNP with VCEK and chain) or a raw SGX / TDX DCAP quote with its collateral next
to it as ``<quote file>_collateral.json``. Without ``--policy`` the strict default policy applies
(no simulated quotes, no debug, TCB ``UpToDate``, empty measurement allow-list).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from shieldtune.errors import AttestationError, ExitCode, ShieldtuneError, exit_code_for
from shieldtune.tee.attestation import Evidence, EvidenceKind, Policy, Quote, Verifier
from shieldtune.tee.program import ENCLAVE_PROGRAMS, measure_program

__all__ = ["EPILOG", "attest_command", "load_evidence"]

EPILOG = (
    "Examples:\n\n"
    "  shieldtune attest --show-measurements\n\n"
    "  shieldtune attest evidence.json --policy policy.yaml\n\n"
    "  shieldtune attest tdx_quote --policy tdx.yaml --at 2025-07-01T00:00:00Z"
)
_SIMULATED_WARNING = (
    "policy.allow_simulated is TRUE: quotes from a SIMULATED enclave (no hardware protection) "
    "are accepted. Use this for development and tests only."
)


def load_evidence(path: Path) -> Evidence:
    """Read evidence JSON, or a raw DCAP quote with ``<path>_collateral.json`` beside it.

    Raises:
        AttestationError: Unreadable file, unknown format, or missing collateral.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AttestationError(f"quote file {path}: {err.strerror}") from None
    if data.lstrip()[:1] == b"{":
        return Evidence.from_json(data)
    if len(data) < 48:
        raise AttestationError(f"quote file {path} is neither evidence JSON nor a DCAP quote")
    tee_type = int.from_bytes(data[4:8], "little")
    kinds: dict[int, EvidenceKind] = {0x00: "sgx-dcap", 0x81: "tdx-dcap"}
    if tee_type not in kinds:
        raise AttestationError(
            f"quote file {path}: TEE type {tee_type:#x} is not SGX (0x0) or TDX (0x81); write "
            "SEV-SNP and simulated evidence as evidence JSON"
        )
    collateral = path.with_name(path.name + "_collateral.json")
    if not collateral.is_file():
        raise AttestationError(
            f"raw DCAP quote {path} needs its collateral at {collateral} (dcap_qvl.get_collateral)"
        )
    return Evidence(kind=kinds[tee_type], quote=data, collateral=collateral.read_text())


def _measurements_table() -> Table:
    table = Table(title="Enclave programs (simulated-backend measurement, default config {})")
    table.add_column("program")
    table.add_column("measurement (SHA-256 of code + config)")
    for name in ENCLAVE_PROGRAMS.names():
        table.add_row(name, measure_program(name, {}))
    return table


def _claims_table(quote: Quote) -> Table:
    table = Table(title=f"{quote.kind} evidence", show_header=False)
    table.add_column("claim", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row(
        "simulated", "[bold red]YES: no hardware protection[/]" if quote.simulated else "no"
    )
    table.add_row("measurement", quote.measurement)
    table.add_row("report data", quote.report_data.hex())
    table.add_row("debug", "[bold red]YES[/]" if quote.debug else "no")
    if quote.tcb_status is not None:
        table.add_row("TCB status", quote.tcb_status)
    if quote.advisory_ids:
        table.add_row("advisories", ", ".join(quote.advisory_ids))
    for key, value in quote.details.items():
        table.add_row(key, value)
    return table


def attest_command(
    quote_file: Path | None,
    policy_file: Path | None,
    show_measurements: bool,
    *,
    at: datetime | None = None,
    report_data_hex: str | None = None,
    console: Console | None = None,
) -> int:
    """Show measurements and/or verify a quote file.

    Args:
        quote_file: Evidence JSON or raw DCAP quote to verify (None: verify nothing).
        policy_file: YAML/JSON policy (None: the strict default policy).
        show_measurements: Print the measurement of every registered enclave program.
        at: Verification time (default now); collateral must be valid at that time.
        report_data_hex: If given, the quote's 64-byte report data must equal it.
        console: Where to print (default: stdout).

    Returns:
        An :class:`~shieldtune.errors.ExitCode` value: 0 verified, 6 refused, 3 bad policy...
    """
    console = console or Console()
    if not quote_file and not show_measurements:
        console.print("nothing to do: give a quote file and/or --show-measurements")
        return int(ExitCode.USAGE)
    try:
        if show_measurements:
            console.print(_measurements_table())
        if quote_file is None:
            return int(ExitCode.OK)
        policy = Policy.load(policy_file) if policy_file else Policy()
        if policy.allow_simulated:
            console.print(Panel(_SIMULATED_WARNING, title="WARNING", style="bold yellow"))
        when = at or datetime.now(timezone.utc)
        verifier = Verifier(policy)
        quote = verifier.authenticate(load_evidence(quote_file), when)
        console.print(_claims_table(quote))
        verifier.check_policy(quote)
        if report_data_hex is not None and quote.report_data.hex() != report_data_hex.lower():
            raise AttestationError("report data differs from the expected --report-data")
    except ShieldtuneError as err:
        console.print(f"[bold red]REFUSED[/]: {err}", highlight=False)
        return int(exit_code_for(err))
    source = f"policy {policy_file}" if policy_file else "the strict default policy"
    console.print(
        f"[bold green]VERIFIED[/] against {source} at {when.isoformat()}"
        + ("" if report_data_hex else " (report data shown above; not checked against a binding)")
    )
    if quote.simulated:
        console.print("[bold yellow]note[/]: this is a SIMULATED enclave (no hardware protection)")
    return int(ExitCode.OK)
