"""The ``shieldtune`` command: a thin table of subcommands (each in its own module).

Exit codes (documented): 0 ok, 1 unexpected, 2 usage, 3 config, 4 data, 5 model,
6 attestation, 7 channel, 8 integrity, 9 mask reuse, 10 sealing, 11 enclave, 12 other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shieldtune.cli._common import guarded

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="shieldtune: secure distributed fine-tuning of LLMs.",
)


def _exit(code: int) -> None:
    raise typer.Exit(code)


from shieldtune.cli.train import EPILOG as _TRAIN_EPILOG  # noqa: E402


@app.command(epilog=_TRAIN_EPILOG)
def train(
    config: Annotated[
        Path | None, typer.Argument(help="YAML run config (default: built-in)")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="override: key.path=value")
    ] = None,
) -> None:
    """Fine-tune a model in one mode (local, plain-split) and write a run folder."""
    from shieldtune.cli.train import train_command

    _exit(guarded(lambda: train_command(config, set_ or [])))


@app.command(epilog="Example:\n\n  shieldtune demo --epochs 1")
def demo(
    output_dir: Annotated[str, typer.Option(help="parent folder of run folders")] = "runs",
    max_train: Annotated[int | None, typer.Option(help="cap on training rows")] = None,
    epochs: Annotated[int, typer.Option(help="training epochs")] = 1,
) -> None:
    """Run the main job on the built-in default and print the test accuracy."""
    from shieldtune.cli.demo import demo_command

    _exit(guarded(lambda: demo_command(output_dir, max_train, epochs)))


@app.command(
    epilog="Examples:\n\n  shieldtune attest --show-measurements\n\n"
    "  shieldtune attest evidence.json --policy policy.yaml --at 2025-07-01T00:00:00Z"
)
def attest(
    quote_file: Annotated[
        Path | None, typer.Argument(help="evidence JSON or raw DCAP quote")
    ] = None,
    policy: Annotated[Path | None, typer.Option(help="policy YAML/JSON (default: strict)")] = None,
    show_measurements: Annotated[
        bool, typer.Option("--show-measurements", help="print enclave program measurements")
    ] = False,
    at: Annotated[
        str | None, typer.Option(help="verification time, ISO 8601 (default: now)")
    ] = None,
    report_data: Annotated[str | None, typer.Option(help="expected report data, hex")] = None,
) -> None:
    """Print enclave measurements and verify a quote file against a policy."""
    from datetime import datetime

    from shieldtune.cli.attest import attest_command

    def body() -> int:
        when = datetime.fromisoformat(at.replace("Z", "+00:00")) if at else None
        show = show_measurements or quote_file is None  # nothing to verify: show measurements
        return attest_command(quote_file, policy, show, at=when, report_data_hex=report_data)

    _exit(guarded(body))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
