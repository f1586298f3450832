"""Split fine-tuning across machines, on loopback for real (``shieldtune serve`` / ``join``).

``shieldtune serve`` (the split-server enclave behind its gRPC relay, TLS from a throwaway CA)
and ``shieldtune join`` run as separate OS processes, as the README's split "Across machines"
commands start them. Meanwhile this process runs the same config with ``shieldtune train``
(one machine), and tries the joins that must be refused against the live server. Every process
is stopped in ``finally`` and the run checks that none is left.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from _procs import free_port, port_free, site, tls_handshake, wait_for
from _tiny import table_overrides
from typer.testing import CliRunner

from shieldtune.cli.app import app
from shieldtune.errors import ExitCode
from shieldtune.split.service import SIMULATED_TEE
from shieldtune.tee.audit import AuditLog
from shieldtune.tee.backends.simulated import PLATFORM_KEY_ENV, SimulatedPlatform

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "split" / "spf_lora_tiny.yaml")
STEPS = 4
runner = CliRunner()


def _sets(table: Path, *extra: str) -> list[str]:
    overrides = [
        *table_overrides(table),
        "data.max_length=32",
        "data.max_test_examples=8",
        "train.batch_size=8",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        *extra,
    ]
    return [f"--set={o}" for o in overrides]


@dataclass
class OneClient:
    server: Path
    client: Path
    local: Path
    serve_log: str
    platform_key: str
    refusals: dict[str, tuple[int, str]]
    left_behind: set[int]


def _join(
    sets: list[str], port: int, certs: Path, *extra: str, config: str = CONFIG
) -> tuple[int, str]:
    """A join in this process (its run folder, were it ever made, goes next to ``certs``)."""
    args = ["join", config, *sets, "--server", f"127.0.0.1:{port}", "--certs", str(certs)]
    out = f"--set=output_dir={certs.parent / 'refused'}"
    result = runner.invoke(app, [*args, out, *extra])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def one_client(tmp_path_factory: pytest.TempPathFactory) -> OneClient:
    """serve + join of one split client to completion; meanwhile the one-machine run and the
    joins the live server must refuse."""
    base = tmp_path_factory.mktemp("split-deploy")
    where = site(base, rows=48)
    certs, key, procs, port = where.certs, where.platform_key, where.procs, where.port
    sets = _sets(where.table)
    refusals: dict[str, tuple[int, str]] = {}
    try:
        serve = procs.start(
            "serve", "serve", CONFIG, *sets, f"--set=output_dir={base / 'server'}",
            "--set=run_name=deployed", "--certs", str(certs), "--port", str(port),
        )  # fmt: skip
        # the one-machine run of the same config (shieldtune train), in this process
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(PLATFORM_KEY_ENV, str(where.key_file))
            local = runner.invoke(
                app, ["train", CONFIG, *sets, f"--set=output_dir={base}", "--set=run_name=local"]
            )
        assert local.exit_code == 0, local.output
        wait_for(lambda: "split relay listening" in procs.log("serve"), 120, "the relay", procs)
        # TLS for real: the split CA verifies the relay, another CA does not
        tls_handshake(port, certs / "ca.pem")
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED|certificate verify"):
            tls_handshake(port, where.other_ca / "ca.pem")
        # joins the live server refuses (none of them opens a session stream)
        other_key = SimulatedPlatform(base / "other-platform").public_key_hex
        refusals["no opt-in"] = _join(
            sets, port, certs, "--set=split.allow_simulated=false", "--trust-platform-key", key
        )
        refusals["wrong key"] = _join(sets, port, certs, "--trust-platform-key", other_key)
        refusals["other config"] = _join(
            [*sets, "--set=train.lr=0.1"], port, certs, "--trust-platform-key", key
        )
        refusals["no key"] = _join(sets, port, certs)
        # the real client, in its own process
        join = procs.start(
            "join", "join", CONFIG, *sets, f"--set=output_dir={base / 'client'}",
            "--set=run_name=deployed", "--server", f"127.0.0.1:{port}", "--certs", str(certs),
            "--trust-platform-key", key,
        )  # fmt: skip
        done = lambda: serve.poll() is not None and join.poll() is not None  # noqa: E731
        wait_for(done, 240, "serve and join to finish", procs)
        assert join.returncode == 0, procs.log("join")
        assert serve.returncode == 0, procs.log("serve")
        serve_log = procs.log("serve")
    finally:
        procs.stop_all()
    return OneClient(
        base / "server" / "deployed",
        base / "client" / "deployed",
        base / "local",
        serve_log,
        key,
        refusals,
        where.left_behind(),
    )


def _lines(run: Path, kind: str) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == kind]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.timeout(420)
def test_deployed_split_equals_the_one_machine_run(one_client: OneClient) -> None:
    # Assert: every step's loss and the evaluation as `shieldtune train` computed them
    deployed, local = _lines(one_client.client, "train"), _lines(one_client.local, "train")
    assert [x["step"] for x in deployed] == list(range(1, STEPS + 1))
    for d, m in zip(deployed, local, strict=True):
        assert d["loss"] == pytest.approx(m["loss"], abs=1e-5)
    (d_eval,), (m_eval,) = _lines(one_client.client, "eval"), _lines(one_client.local, "eval")
    assert d_eval["loss"] == pytest.approx(m_eval["loss"], abs=1e-5)
    assert d_eval["accuracy"] == m_eval["accuracy"]
    client, server = _summary(one_client.client), _summary(one_client.server)
    assert client["server_steps"] == server["server_steps"] == server["planned_steps"] == STEPS
    assert client["enclave_measurement"] == server["enclave_measurement"]
    assert client["enclave_measurement"] == _summary(one_client.local)["enclave_measurement"]
    # the client's own front delta is in its folder, in the clear; the wire carried records
    assert (one_client.client / "front_adapter").is_dir()
    assert client["tee"] == SIMULATED_TEE and client["tls"] is True
    assert 0 < client["wire_bytes_sent"] <= server["relay_bytes_in"]
    assert not one_client.left_behind, f"processes left behind: {one_client.left_behind}"


@pytest.mark.timeout(420)
def test_server_folder_holds_sealed_state_and_an_all_encrypted_audit(
    one_client: OneClient,
) -> None:
    files = {p.name for p in one_client.server.iterdir()}
    assert files == {
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "back_adapter.sealed",
        "enclave_audit.jsonl",
    }
    assert (one_client.server / "metrics.jsonl").read_text() == ""  # no loss seen on the host
    summary = _summary(one_client.server)
    assert summary["tee"] == SIMULATED_TEE and summary["relay_tls"] is True
    assert summary["client_sessions"] == ["finished"] and summary["interrupted"] is False
    crossings = AuditLog.read_jsonl(one_client.server / "enclave_audit.jsonl")
    clear = {t.name for c in crossings if c.protection == "clear" for t in c.tensors}
    assert clear <= {"config", "sealing_key", "hello", "enclave_public", "report_data"}
    calls = [c for c in crossings if c.call == "channel_call"]
    assert len(calls) >= 2 * STEPS and all(c.protection == "encrypted" for c in calls)
    # serve said, on its console, that the enclave is simulated and which key to pin
    log = one_client.serve_log
    assert "SIMULATED" in log and one_client.platform_key in log.replace("\n", "")
    assert "(TLS)" in log


@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("no opt-in", ExitCode.ATTESTATION, "simulated"),
        ("wrong key", ExitCode.ATTESTATION, "platform"),
        ("other config", ExitCode.ATTESTATION, "measurement"),
        ("no key", ExitCode.CONFIG, "--trust-platform-key"),
    ],
)
def test_join_refuses_an_enclave_it_cannot_verify(
    one_client: OneClient, case: str, code: int, message: str
) -> None:
    exit_code, output = one_client.refusals[case]
    errors = [line for line in output.splitlines() if line.startswith("error")]
    assert exit_code == code, output
    assert len(errors) == 1 and message in errors[0].lower(), output


def test_an_interrupted_server_still_seals_its_state(tmp_path: Path) -> None:
    # Prepare: a server nobody joins
    where = site(tmp_path, rows=48)
    runs = tmp_path / "server"
    args = [CONFIG, *_sets(where.table), f"--set=output_dir={runs}", "--set=run_name=cut"]
    procs = where.procs
    try:
        serve = procs.start("serve", "serve", *args, "--insecure", "--port", str(where.port))
        wait_for(lambda: "split relay listening" in procs.log("serve"), 120, "relay", procs)
        # Execute: SIGTERM, as a service manager stops it (Ctrl-C is the same)
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
    finally:
        procs.stop_all()
    # Assert: exit 130, the folder is complete with the (untouched) server state sealed
    assert serve.returncode == 130, procs.log("serve")
    summary = _summary(runs / "cut")
    assert summary["interrupted"] is True and summary["server_steps"] == 0
    assert summary["client_sessions"] == [] and (runs / "cut" / "back_adapter.sealed").is_file()
    assert "NO TLS" in procs.log("serve")
    assert not where.left_behind()


def test_join_to_a_dead_port_is_a_channel_error(tmp_path: Path, keyword_table: Path) -> None:
    port = free_port()  # nothing listens there
    args = ["join", CONFIG, *_sets(keyword_table), "--server", f"127.0.0.1:{port}"]
    result = runner.invoke(app, [*args, "--insecure", "--trust-platform-key", "00" * 32,
                                 "--connect-timeout", "2"])  # fmt: skip
    assert result.exit_code == ExitCode.CHANNEL, result.output
    assert "unavailable" in result.output.lower() or "deadline" in result.output.lower()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set=mode=local"], "split, plain-fedavg or secure-fedavg"),
        (["--set=mode=plain-split"], "split, plain-fedavg or secure-fedavg"),
        (["--set=split.allow_simulated=false"], "allow_simulated"),
        (["--superlink", "h:1"], "--superlink"),
    ],
)
def test_serve_refuses_what_it_cannot_run(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["serve", CONFIG, "--insecure", *args])
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert message in result.output


# --------------------------------------------------------------------------- two clients
MULTI = str(REPO / "configs" / "split" / "multi_spf_lora_tiny.yaml")


@pytest.mark.parametrize(
    ("config", "args", "message"),
    [
        (CONFIG, ["--partition-id", "0", "--num-partitions", "2"], "--client"),
        (CONFIG, ["--client", "1"], "outside 0..0"),
        (MULTI, ["--client", "3"], "outside 0..2"),
        (MULTI, ["--client", "0", "--no-worker", "--insecure"], "--no-worker"),
        (MULTI, ["--client", "0", "--connect-timeout", "0"], "--connect-timeout"),
    ],
)
def test_join_refuses_options_split_does_not_take(
    config: str, args: list[str], message: str
) -> None:
    result = runner.invoke(app, ["join", config, "--server", "h:1", *args])
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert message in result.output


@dataclass
class TwoClients:
    server: Path
    clients: list[Path]
    local: Path
    refused: tuple[int, str]
    left_behind: set[int]


@pytest.fixture(scope="module")
def two_clients(tmp_path_factory: pytest.TempPathFactory) -> TwoClients:
    """serve + 2 joins of a 2-round per_client split federation on Flower, to completion;
    meanwhile the same config with `shieldtune train` and a join that must be refused."""
    base = tmp_path_factory.mktemp("split-deploy-2")
    where = site(base, rows=40)
    certs, key, procs, port = where.certs, where.platform_key, where.procs, where.port
    sets = [
        f"--set={o}"
        for o in (*table_overrides(where.table), "data.max_length=32", "data.max_test_examples=8",
                  "split.clients=2", "train.batch_size=8", "federated.round_timeout_s=240")
    ]  # fmt: skip
    tls = ["--certs", str(certs)]
    try:
        serve = procs.start(
            "serve", "serve", MULTI, *sets, f"--set=output_dir={base / 'server'}",
            "--set=run_name=deployed", *tls, "--port", str(port),
        )  # fmt: skip
        joins = [
            procs.start(
                f"join{i}", "join", MULTI, *sets, f"--set=output_dir={base / f'client{i}'}",
                "--set=run_name=deployed", "--server", f"127.0.0.1:{port}", *tls,
                "--client", str(i), "--trust-platform-key", key,
            )
            for i in range(2)
        ]  # fmt: skip
        with pytest.MonkeyPatch.context() as mp:  # the one-machine federation, in this process
            mp.setenv(PLATFORM_KEY_ENV, str(where.key_file))
            local = runner.invoke(
                app, ["train", MULTI, *sets, f"--set=output_dir={base}", "--set=run_name=local"]
            )
        assert local.exit_code == 0, local.output
        wait_for(lambda: not port_free(port), 180, "the split relay (ServerApp)", procs)
        other_key = SimulatedPlatform(base / "other-platform").public_key_hex
        refused = _join(
            sets, port, certs, "--client", "1", "--trust-platform-key", other_key, config=MULTI
        )
        done = lambda: all(p.poll() is not None for p in (serve, *joins))  # noqa: E731
        wait_for(done, 420, "serve and both joins to finish", procs)
        for name, proc in (("serve", serve), ("join0", joins[0]), ("join1", joins[1])):
            assert proc.returncode == 0, procs.log(name)
    finally:
        procs.stop_all()
    clients = [base / f"client{i}" / "deployed" for i in range(2)]
    left = where.left_behind()
    return TwoClients(base / "server" / "deployed", clients, base / "local", refused, left)


def _steps(run: Path) -> dict[tuple[int, int, int], float]:
    return {(x["client"], x["round"], x["step"]): x["loss"] for x in _lines(run, "client_step")}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_deployed_split_clients_equal_the_one_machine_federation(
    two_clients: TwoClients,
) -> None:
    # Assert: each client's steps (in its own folder) are the simulation's, step for step
    local = _steps(two_clients.local)
    deployed: dict[tuple[int, int, int], float] = {}
    for run in two_clients.clients:
        deployed.update(_steps(run))
    assert deployed.keys() == local.keys() and {k[1] for k in local} == {1, 2}
    for k, loss in local.items():
        assert deployed[k] == pytest.approx(loss, abs=1e-5), k
    # the server's global evaluation per round is the simulation's
    s_eval, m_eval = _lines(two_clients.server, "eval"), _lines(two_clients.local, "eval")
    assert [e["step"] for e in s_eval] == [1, 2] and all(e["clients"] == 2 for e in s_eval)
    for s, m in zip(s_eval, m_eval, strict=True):
        assert s["loss"] == pytest.approx(m["loss"], abs=1e-5)
    # steps: the server's == Σ the clients' (their folders and their reports)
    server = _summary(two_clients.server)
    steps = [_summary(run)["steps"] for run in two_clients.clients]
    assert server["server_steps"] == sum(steps) == sum(server["client_steps"]) > 0
    assert [r["steps"] for r in server["client_reports"]] == steps
    assert [e["averaged"] for e in server["events"] if e["kind"] == "after_train"] == [2, 2]
    for run in two_clients.clients:
        client = _summary(run)
        assert client["rounds"] == 2 and client["tee"] == SIMULATED_TEE and client["tls"] is True
        assert client["wire_bytes_sent"] > 0 and (run / "front_adapter").is_dir()
    assert not two_clients.left_behind, f"processes left behind: {two_clients.left_behind}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_client_server_folder_holds_no_secret_in_the_clear(two_clients: TwoClients) -> None:
    files = {p.name for p in two_clients.server.iterdir()}
    assert files == {
        "config.yaml", "metrics.jsonl", "summary.json", "curves.png", "back_adapter.sealed",
        "enclave_audit.jsonl", "audit.jsonl",
    }  # fmt: skip
    for audit in ("enclave_audit.jsonl", "audit.jsonl"):  # split-server, fedavg-sparse
        crossings = AuditLog.read_jsonl(two_clients.server / audit)
        clear = {t.name for c in crossings if c.protection == "clear" for t in c.tensors}
        assert clear <= {"config", "sealing_key", "hello", "enclave_public", "report_data"}
        calls = [c for c in crossings if c.call == "channel_call"]
        assert calls and all(c.protection == "encrypted" for c in calls)
    summary = _summary(two_clients.server)
    assert summary["tee"] == summary["aggregation_tee"] == SIMULATED_TEE
    assert summary["relay_tls"] is True and summary["relay_bytes_in"] > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_join_that_pins_another_platform_key_is_refused_at_once(
    two_clients: TwoClients,
) -> None:
    exit_code, output = two_clients.refused
    errors = [line for line in output.splitlines() if line.startswith("error")]
    assert exit_code == ExitCode.ATTESTATION, output
    assert len(errors) == 1 and "platform key" in errors[0], output
