"""``shieldtune attest`` as a function: measurements, verification verdicts and exit codes.

(Lives in tests/tee while tests/cli belongs to another work stream; move it there later.)
"""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console

from shieldtune.cli.attest import attest_command
from shieldtune.errors import ExitCode
from shieldtune.tee.attestation import sign_simulated_quote
from shieldtune.tee.program import measure_program

VECTOR_TIME = datetime(2025, 7, 1, tzinfo=timezone.utc)
TDX_MEASUREMENT = (
    "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
    "de03ae6dc5f87f27428b2538873118b7"
)


def _run(*args, **kwargs) -> tuple[int, str]:
    buf = io.StringIO()
    code = attest_command(*args, console=Console(file=buf, width=200), **kwargs)
    return code, buf.getvalue()


def test_show_measurements_lists_every_program() -> None:
    code, out = _run(None, None, True)
    assert code == ExitCode.OK
    assert "echo" in out and measure_program("echo", {}) in out


def test_nothing_to_do_is_a_usage_error() -> None:
    assert _run(None, None, False)[0] == ExitCode.USAGE


def test_raw_tdx_quote_with_collateral_verifies(tmp_path: Path, attestation_dir: Path) -> None:
    pytest.importorskip("dcap_qvl")
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"allowed_measurements: [{TDX_MEASUREMENT}]\n")
    code, out = _run(attestation_dir / "dcap/tdx_quote", policy, False, at=VECTOR_TIME)
    assert code == ExitCode.OK, out
    assert "VERIFIED" in out and "UpToDate" in out
    # the same policy pinning RTMR3 (the vector's is all zeros) to another value refuses
    policy.write_text(policy.read_text() + f"allowed_claims: {{rt_mr3: ['{'01' * 48}']}}\n")
    code, out = _run(attestation_dir / "dcap/tdx_quote", policy, False, at=VECTOR_TIME)
    assert code == ExitCode.ATTESTATION and "rt_mr3=" + "00" * 48 in out, out
    policy.write_text(policy.read_text().replace("01" * 48, "00" * 48))
    assert _run(attestation_dir / "dcap/tdx_quote", policy, False, at=VECTOR_TIME)[0] == 0
    # unquoted all-digit hex is a YAML number: a config error that says to quote it
    policy.write_text(policy.read_text().replace("'", ""))
    code, out = _run(attestation_dir / "dcap/tdx_quote", policy, False, at=VECTOR_TIME)
    assert code == ExitCode.CONFIG and "number: quote it" in " ".join(out.split()), out


def test_strict_default_policy_refuses_and_expired_time_refuses(attestation_dir: Path) -> None:
    pytest.importorskip("dcap_qvl")
    code, out = _run(attestation_dir / "dcap/tdx_quote", None, False, at=VECTOR_TIME)
    assert code == ExitCode.ATTESTATION and "not in policy.allowed_measurements" in out
    code, out = _run(attestation_dir / "dcap/sgx_quote", None, False)  # now: collateral expired
    assert code == ExitCode.ATTESTATION and "expired" in out.lower()


def test_simulated_quote_warns_on_every_run(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    evidence = sign_simulated_quote(
        key,
        measurement="ab" * 32,
        report_data=b"\x01" * 64,
        nonce=b"\x02" * 32,
        timestamp=int(VECTOR_TIME.timestamp()),
        program="echo",
    )
    quote_file = tmp_path / "evidence.json"
    quote_file.write_text(evidence.to_json())
    policy = tmp_path / "policy.json"
    pub = key.public_key().public_bytes_raw().hex()
    policy.write_text(
        f'{{"allow_simulated": true, "simulated_platform_keys": ["{pub}"], '
        f'"allowed_measurements": ["{"ab" * 32}"]}}'
    )
    code, out = _run(quote_file, policy, False, at=VECTOR_TIME)
    assert code == ExitCode.OK and "WARNING" in out and "SIMULATED" in out
    code, out = _run(quote_file, None, False, at=VECTOR_TIME)
    assert code == ExitCode.ATTESTATION and "allow_simulated is false" in out


def test_bad_policy_and_missing_file_have_their_exit_codes(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("allow_simulted: true\n")
    evidence = tmp_path / "e.json"
    evidence.write_text('{"kind": "simulated", "quote": "AA=="}')
    assert _run(evidence, policy, False)[0] == ExitCode.CONFIG
    code, out = _run(tmp_path / "missing.bin", None, False)
    assert code == ExitCode.ATTESTATION and "No such file" in out
