"""Multi-machine federation on loopback, for real: separate OS processes, real TLS.

``shieldtune serve`` (Flower SuperLink + ServerApp + the simulated server enclave) and two
``shieldtune join`` clients (Flower SuperNodes, one fresh ClientApp process per message) run as
the README's "Across machines" section starts them, with a throwaway CA made by the code of
``shieldtune certs`` (``cryptography`` x509). Every process a run starts is stopped in
``finally`` (process groups, then any descendant), and each run checks that none is left.
Each mode runs once per module (2 clients, 2 rounds); the tests assert on those runs.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _procs import site, tls_handshake, wait_for
from _tiny import table_overrides
from safetensors.torch import load_file

from shieldtune.tee.audit import AuditLog

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "federated" / "secure_fedavg_tiny.yaml"


@dataclass
class Deployed:
    run: Path
    serve_output: str
    adapters: list[Path]
    left_behind: set[int]


def _federate(base: Path, mode: str) -> Deployed:
    """serve + 2 joins of ``mode`` on loopback with TLS, to completion; everything stopped.

    The joins use their warm worker: each message still arrives in a fresh ClientApp process
    with the node's context from the SuperNode, which forwards both to the worker and stores
    the context it sends back, so the secure channel's session crosses Flower between messages
    exactly as it does without the worker (``--no-worker``, slower: the model loads per message).
    """
    where = site(base)
    port, certs, procs = where.port, where.certs, where.procs
    runs = base / "runs"
    shared = [f"--set={o}" for o in table_overrides(where.table)]
    shared += ["--set=data.max_length=32", f"--set=mode={mode}"]
    trust = ["--trust-platform-key", where.platform_key] if mode == "secure-fedavg" else []
    try:
        # the server and two clients, as the README starts them (clients retry until it listens)
        serve = procs.start(
            "serve",
            "serve",
            str(CONFIG),
            *shared,
            f"--set=output_dir={runs}",
            "--set=run_name=deployed",
            "--certs",
            str(certs),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        )
        clients = [
            procs.start(
                f"join{i}",
                "join",
                str(CONFIG),
                *shared,
                "--server",
                f"127.0.0.1:{port}",
                "--certs",
                str(certs),
                "--partition-id",
                str(i),
                "--num-partitions",
                "2",
                *trust,
                "--save-adapter",
                str(base / f"adapter{i}"),
            )
            for i in range(2)
        ]
        wait_for(lambda: "SuperLink listening" in procs.log("serve"), 90, "the SuperLink", procs)
        # TLS for real: the federation's CA verifies the SuperLink, another CA does not
        tls_handshake(port, certs / "ca.pem")
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_handshake(port, where.other_ca / "ca.pem")
        wait_for(lambda: serve.poll() is not None, 200, "the federation to finish", procs)
        out = procs.log("serve")
        assert serve.returncode == 0, out
        assert all(c.poll() is None for c in clients)  # SuperNodes serve until stopped
    finally:
        procs.stop_all()
    left_behind = where.left_behind()
    adapters = [base / f"adapter{i}" / "adapter_model.safetensors" for i in range(2)]
    return Deployed(runs / "deployed", out, adapters, left_behind)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    done: dict[str, Deployed] = {}

    def get(mode: str) -> Deployed:
        if mode not in done:
            done[mode] = _federate(tmp_path_factory.mktemp(mode), mode)
        return done[mode]

    return get


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _check_rounds(d: Deployed) -> dict:
    lines = _lines(d.run)
    evals = [x for x in lines if x["kind"] == "eval"]
    assert [e["step"] for e in evals] == [1, 2]
    assert all(e["clients"] == 2 and 0.0 <= e["accuracy"] <= 1.0 for e in evals)
    assert [x["accepted"] for x in lines if x["kind"] == "train"] == [2, 2]
    summary = json.loads((d.run / "summary.json").read_text())
    assert summary["rounds"] == 2 and [h["step"] for h in summary["history"]] == [1, 2]
    assert summary["examples"] == 19  # the whole held-out split (20 % of 96 rows)
    assert "round 1:" in d.serve_output and "round 2:" in d.serve_output
    # both clients ended with the same global adapter
    a, b = (load_file(p) for p in d.adapters)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not d.left_behind, f"processes left behind: {d.left_behind}"
    return summary


@pytest.mark.timeout(240)
def test_secure_fedavg_across_processes_with_tls(deployed):
    d = deployed("secure-fedavg")
    summary = _check_rounds(d)
    assert summary["simulated_enclave"] is True and "SIMULATED" in d.serve_output
    assert (d.run / "server_state.sealed").is_file() and summary["sealed_round"] == 2
    # the host side never held an update or the global adapter in the clear
    crossings = AuditLog.read_jsonl(d.run / "audit.jsonl")
    clear = {t.name for c in crossings if c.protection == "clear" for t in c.tensors}
    assert clear <= {"config", "sealing_key", "hello", "enclave_public", "report_data"}
    assert sum(c.call == "channel_call" and c.protection == "encrypted" for c in crossings) >= 8


@pytest.mark.timeout(240)
def test_plain_fedavg_across_processes_with_tls(deployed):
    d = deployed("plain-fedavg")
    summary = _check_rounds(d)
    assert "simulated_enclave" not in summary and not (d.run / "audit.jsonl").exists()


@pytest.mark.timeout(240)
def test_deployed_secure_and_plain_fedavg_agree(deployed):
    # same seeds, same data: the enclave's aggregate is plain FedAvg's, across real processes
    secure, plain = deployed("secure-fedavg"), deployed("plain-fedavg")
    s_eval = [x for x in _lines(secure.run) if x["kind"] == "eval"]
    p_eval = [x for x in _lines(plain.run) if x["kind"] == "eval"]
    for s, p in zip(s_eval, p_eval, strict=True):
        assert s["loss"] == pytest.approx(p["loss"], abs=1e-6)
        assert s["accuracy"] == p["accuracy"]
    a, b = load_file(secure.adapters[0]), load_file(plain.adapters[0])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
