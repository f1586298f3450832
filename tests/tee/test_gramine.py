"""Gramine-SGX backend: manifest generation and in-enclave quoting through /dev/attestation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from shieldtune.crypto.channel import ServerHello, client_hello, report_data
from shieldtune.errors import AttestationError, ConfigError
from shieldtune.tee.attestation import Evidence, Policy, Verifier
from shieldtune.tee.backends.gramine_sgx import (
    gramine_sgx_enclave,
    manifest_template,
    read_quote,
    write_manifest,
)
from shieldtune.tee.program import measure_program


def _fake_dev_attestation(root: Path, quote: bytes = b"FAKE-SGX-QUOTE") -> Path:
    root.mkdir(parents=True)
    (root / "attestation_type").write_text("dcap")
    (root / "quote").write_bytes(quote)
    (root / "keys").mkdir()
    (root / "keys" / "_sgx_mrenclave").write_bytes(b"k" * 16)
    return root


def test_manifest_renders_to_valid_toml_with_dcap_and_no_debug(tmp_path: Path) -> None:
    jinja2 = pytest.importorskip("jinja2")
    tomllib = pytest.importorskip("tomllib")
    # Prepare
    path = write_manifest("echo", {"a": 1}, tmp_path)

    class Gramine:
        libos = "/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so"

        def runtimedir(self) -> str:
            return "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc"

    class Python:
        def get_sys_path(self, entrypoint: str) -> list[Path]:
            return [Path(p) for p in sys.path if p and Path(p).exists()]

    # Execute: render as gramine-manifest would
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    text = env.from_string(path.read_text()).render(
        gramine=Gramine(),
        python=Python(),
        entrypoint=sys.executable,
        arch_libdir="/lib/x86_64-linux-gnu",
        log_level="error",
        env={},
    )
    manifest = tomllib.loads(text)
    # Assert
    assert manifest["loader"]["argv"] == ["python3", "-m", "shieldtune.tee.runtime"]
    assert manifest["sgx"]["debug"] is False
    assert manifest["sgx"]["remote_attestation"] == "dcap"
    assert manifest["loader"]["env"]["SHIELDTUNE_PROGRAM_MEASUREMENT"] == measure_program(
        "echo", {"a": 1}
    )
    src_root = Path(__file__).resolve().parents[2] / "src"
    assert f"file:{src_root}/" in manifest["sgx"]["trusted_files"]
    assert "insecure" not in path.read_text()


def test_read_quote_writes_report_data_then_reads_the_quote(tmp_path: Path) -> None:
    root = _fake_dev_attestation(tmp_path / "attestation")
    assert read_quote(b"\x05" * 64, root) == b"FAKE-SGX-QUOTE"
    assert (root / "user_report_data").read_bytes() == b"\x05" * 64
    (root / "attestation_type").write_text("none")
    with pytest.raises(AttestationError, match="must set sgx.remote_attestation"):
        read_quote(b"\x05" * 64, root)
    with pytest.raises(AttestationError, match="not running inside a Gramine"):
        read_quote(b"\x05" * 64, tmp_path / "nowhere")
    with pytest.raises(AttestationError, match="64 bytes"):
        read_quote(b"\x05", root)


def test_enclave_quotes_itself_and_seals_with_the_gramine_key(tmp_path: Path) -> None:
    # Prepare: run the runtime directly (no SGX here) with a fake /dev/attestation
    root = _fake_dev_attestation(tmp_path / "attestation")
    enclave = gramine_sgx_enclave(
        "echo",
        launcher=[sys.executable, "-m", "shieldtune.tee.runtime"],
        attestation_root=root,
        state_dir=tmp_path / "state",
        collateral=lambda quote: f"collateral for {quote.decode()}",
    )
    verifier = Verifier(Policy())
    keys, hello = client_hello(verifier.issue_nonce())
    with enclave:
        # Execute
        _, server_hello = enclave.open_channel(hello.to_bytes())
        bound = (root / "user_report_data").read_bytes()
        round_ = enclave.seal(tmp_path / "state.sealed")
    server = ServerHello.from_bytes(server_hello)
    evidence = Evidence.from_json(server.evidence)
    # Assert: the enclave (not the host) wrote SHA-512(E || n || C) and returned the SGX quote
    assert bound == report_data(server.enclave_public, hello.nonce, hello.client_public)
    assert evidence.kind == "sgx-dcap" and evidence.quote == b"FAKE-SGX-QUOTE"
    assert evidence.collateral == "collateral for FAKE-SGX-QUOTE"  # attached by the host
    assert round_ == 1 and not enclave.simulated
    with pytest.raises(AttestationError, match="collateral is malformed"):
        verifier.verify_channel(evidence, hello=hello, enclave_public=server.enclave_public)


def test_manifest_refuses_unknown_programs() -> None:
    with pytest.raises(ConfigError, match="unknown enclave program"):
        manifest_template("nope", {})
