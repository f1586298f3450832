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
    resume: Annotated[
        Path | None,
        typer.Option(help="secure-fedavg: continue this interrupted run folder (sealed state)"),
    ] = None,
) -> None:
    """Fine-tune a model in the config's mode (local, plain-split, split, plain-fedavg,
    secure-fedavg, shielded, shielded-fedavg) and write a run folder."""
    from shieldtune.cli.train import train_command

    _exit(guarded(lambda: train_command(config, set_ or [], resume)))


from shieldtune.cli.experiment import EPILOG as _EXPERIMENT_EPILOG  # noqa: E402
from shieldtune.cli.report import EPILOG as _REPORT_EPILOG  # noqa: E402


@app.command(epilog=_EXPERIMENT_EPILOG)
def experiment(
    config: Annotated[
        Path, typer.Argument(help="YAML experiment config (datasets × rows × seeds)")
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="override every cell's run config: key.path=value"),
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option(help="experiment folder (default: the config's output_dir)")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the cells; run none")] = False,
    collect: Annotated[
        bool,
        typer.Option(
            "--collect",
            help="run no cell: write the table from the cells whose run folders completed "
            "(e.g. copied into runs/ from another machine); the others stay pending",
        ),
    ] = False,
    seed: Annotated[
        list[int] | None, typer.Option("--seed", help="run only the cells of this seed (repeat)")
    ] = None,
    dataset: Annotated[
        list[str] | None,
        typer.Option("--dataset", help="run only the cells of this dataset (repeat)"),
    ] = None,
    row: Annotated[
        list[str] | None,
        typer.Option("--row", help="run only the cells of this row, by its name (repeat)"),
    ] = None,
) -> None:
    """Run a grid of datasets × rows × seeds through the recipes; write one results table
    (results.csv, results.json, results.md). Running it again resumes; several invocations
    may share one folder (each cell runs once, under a lock)."""
    from shieldtune.cli.experiment import Selection, experiment_command

    only = Selection(tuple(seed or ()), tuple(dataset or ()), tuple(row or ()))
    _exit(
        guarded(lambda: experiment_command(config, set_ or [], output_dir, dry_run, collect, only))
    )


@app.command(epilog=_REPORT_EPILOG)
def report(
    run_dir: Annotated[Path, typer.Argument(help="experiment folder (holds results.json)")],
) -> None:
    """Write report.html (self-contained) and report.md into an experiment folder: tables,
    training curves, leakage by cut layer, overhead ratios, provenance."""
    from shieldtune.cli.report import report_command

    _exit(guarded(lambda: report_command(run_dir)))


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


from shieldtune.cli.certs import EPILOG as _CERTS_EPILOG  # noqa: E402
from shieldtune.cli.join import EPILOG as _JOIN_EPILOG  # noqa: E402
from shieldtune.cli.serve import EPILOG as _SERVE_EPILOG  # noqa: E402

_Set = Annotated[list[str] | None, typer.Option("--set", "-s", help="override: key.path=value")]
_Certs = Annotated[Path | None, typer.Option(help="folder of `shieldtune certs` (TLS)")]
_Insecure = Annotated[bool, typer.Option("--insecure", help="no TLS (trusted test nets only)")]


@app.command(epilog=_SERVE_EPILOG)
def serve(
    config: Annotated[
        Path | None, typer.Argument(help="YAML run config (split, plain/secure-fedavg)")
    ],
    set_: _Set = None,
    host: Annotated[
        str,
        typer.Option(
            help="address the SuperLink (split: the relay) listens on (0.0.0.0: all interfaces)"
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            help="SuperLink HTTPS port (split: the relay's; with split.clients > 1 the "
            "SuperLink takes the next port)"
        ),
    ] = 9092,
    certs: _Certs = None,
    insecure: _Insecure = False,
    superlink: Annotated[
        str | None, typer.Option(help="HOST:PORT of a running SuperLink (start none)")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="secure-fedavg: continue this interrupted run folder")
    ] = None,
) -> None:
    """Run the server of a multi-machine federation (Flower SuperLink + ServerApp), or of split
    fine-tuning (the split-server enclave + its gRPC relay)."""
    from shieldtune.cli.serve import serve_command

    def body() -> int:
        return serve_command(
            config,
            set_ or [],
            host=host,
            port=port,
            certs=certs,
            insecure=insecure,
            superlink=superlink,
            resume=resume,
        )

    _exit(guarded(body))


@app.command(epilog=_JOIN_EPILOG)
def join(
    config: Annotated[
        Path | None, typer.Argument(help="YAML run config (split, plain/secure-fedavg)")
    ],
    server: Annotated[
        str, typer.Option(help="HOST:PORT of the server's SuperLink (split: of its relay)")
    ],
    partition_id: Annotated[
        int | None, typer.Option(help="federated: this client's share of the data")
    ] = None,
    num_partitions: Annotated[
        int | None, typer.Option(help="federated: shares the data is split into")
    ] = None,
    client: Annotated[
        int | None, typer.Option(help="split: this client's share N of split.clients (0)")
    ] = None,
    connect_timeout: Annotated[
        float, typer.Option(help="split: seconds to wait for the server to be reachable")
    ] = 120.0,
    set_: _Set = None,
    certs: _Certs = None,
    insecure: _Insecure = False,
    trust_platform_key: Annotated[
        list[str] | None,
        typer.Option(help="simulated server enclave: its platform key (from serve's output)"),
    ] = None,
    policy: Annotated[Path | None, typer.Option(help="attestation policy YAML/JSON")] = None,
    runtime_port: Annotated[
        int | None, typer.Option(help="local port of the SuperNode's Runtime API (default: free)")
    ] = None,
    save_adapter: Annotated[
        Path | None, typer.Option(help="save each global adapter received here")
    ] = None,
    worker: Annotated[
        bool, typer.Option(help="keep model and data warm in this process between messages")
    ] = True,
) -> None:
    """Join a federation as a client (Flower SuperNode running shieldtune's ClientApp), or a
    split server as a split client."""
    from shieldtune.cli.join import join_command

    def body() -> int:
        return join_command(
            config,
            set_ or [],
            server=server,
            partition_id=partition_id,
            num_partitions=num_partitions,
            certs=certs,
            insecure=insecure,
            trusted_keys=trust_platform_key or [],
            policy_file=policy,
            runtime_port=runtime_port,
            adapter_dir=save_adapter,
            worker=worker,
            client=client,
            connect_timeout_s=connect_timeout,
        )

    _exit(guarded(body))


@app.command(epilog=_CERTS_EPILOG)
def certs(
    out_dir: Annotated[Path, typer.Argument(help="folder for ca.pem, server.pem, server.key")],
    host: Annotated[
        list[str], typer.Option(help="server DNS name or IP clients connect to (repeat)")
    ],
    days: Annotated[int, typer.Option(help="validity in days")] = 30,
    overwrite: Annotated[bool, typer.Option(help="replace existing files")] = False,
) -> None:
    """Make a throwaway CA and the SuperLink's TLS certificate for serve / join."""
    from shieldtune.cli.certs import certs_command

    _exit(guarded(lambda: certs_command(out_dir, host, days, overwrite)))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
