"""serve / join / certs: a bad argument gives one clear line and a documented exit code, before
any Flower process starts."""

from __future__ import annotations

import socket
import stat

import pytest
from typer.testing import CliRunner

from shieldtune.cli.app import app
from shieldtune.errors import ExitCode

runner = CliRunner()
TINY = "configs/federated/secure_fedavg_tiny.yaml"
PLAIN = "configs/federated/plain_fedavg_tiny.yaml"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    result = runner.invoke(
        app, ["certs", str(folder), "--host", "127.0.0.1", "--host", "localhost"]
    )
    assert result.exit_code == 0, result.output
    assert "CA certificate" in result.output
    return folder


def test_certs_writes_the_three_files(certs):
    assert {p.name for p in certs.iterdir()} == {"ca.pem", "server.pem", "server.key"}
    assert stat.S_IMODE((certs / "server.key").stat().st_mode) == 0o600
    again = runner.invoke(app, ["certs", str(certs), "--host", "localhost"])
    assert again.exit_code == ExitCode.CONFIG and "--overwrite" in again.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["certs", "{tmp}", "--host", "bad..name"], "neither an IP address nor a DNS name"),
        (
            ["serve", "configs/local/lora_minilm.yaml", "--insecure"],
            "plain-fedavg or secure-fedavg",
        ),
        (["serve", TINY], "give --certs DIR"),
        (["serve", TINY, "--certs", "{tmp}"], "not found"),
        (["serve", TINY, "--certs", "{certs}", "--insecure"], "exclude each other"),
        (
            ["serve", TINY, "--insecure", "--set", "federated.allow_simulated=false"],
            "allow_simulated",
        ),
        (["serve", TINY, "--insecure", "--superlink", "nohost"], "not HOST:PORT"),
        (["serve", TINY, "--insecure", "--resume", "{tmp}/none"], "no run folder"),
        (
            ["join", TINY, "--server", "fed:xx", "--partition-id", "0", "--num-partitions", "2"],
            "not HOST:PORT",
        ),
        (
            ["join", TINY, "--server", "h:1", "--partition-id", "2", "--num-partitions", "2"],
            "outside 0..1",
        ),
        (
            ["join", TINY, "--server", "h:1", "--partition-id", "0", "--num-partitions", "2"],
            "give --certs",
        ),
        (
            [
                "join",
                TINY,
                "--server",
                "h:1",
                "--partition-id",
                "0",
                "--num-partitions",
                "2",
                "--insecure",
            ],
            "--trust-platform-key",
        ),
        (["train", PLAIN, "--resume", "{tmp}"], "only secure-fedavg"),
    ],
)
def test_bad_arguments_give_one_line_and_a_config_exit_code(tmp_path, certs, args, message):
    args = [a.format(tmp=tmp_path, certs=certs) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_join_refuses_missing_data_before_starting(tmp_path):
    args = ["join", PLAIN, "--server", "h:1", "--partition-id", "0", "--num-partitions", "2"]
    args += ["--insecure", "--set", "data.dataset=table", "--set", f"data.path={tmp_path}/no.csv"]
    args += ["--set", "data.text=t", "--set", "data.label=l"]
    result = runner.invoke(app, args)
    assert result.exit_code == ExitCode.DATA and "no.csv" in result.output


def test_serve_refuses_a_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", PLAIN, "--insecure", "--port", str(port)])
    assert result.exit_code == ExitCode.CONFIG and "in use" in result.output
