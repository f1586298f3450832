"""Verifier: genuine SGX / TDX / SEV-SNP evidence, simulated quotes, policy and freshness."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shieldtune.crypto.channel import client_hello, enclave_accept, generate_keypair, report_data
from shieldtune.errors import AttestationError, ConfigError
from shieldtune.tee.attestation import (
    Evidence,
    NonceRegistry,
    Policy,
    SnpTcb,
    Verifier,
    sign_simulated_quote,
    unix_time,
)

#: Inside the validity window of the DCAP collateral (2025-06-19 .. 2025-07-19) and of the VCEK.
VECTOR_TIME = datetime(2025, 7, 1, tzinfo=timezone.utc)
KINDS = ["sgx", "tdx", "snp"]
MEASUREMENTS = {
    "sgx": "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb",
    "tdx": "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
    "de03ae6dc5f87f27428b2538873118b7",
    "snp": "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d"
    "3e1a0dc39b2c60bd95b9c480cd81841f",
}
# Offsets of the report data inside each raw quote / report.
REPORT_DATA_OFFSET = {"sgx": 368, "tdx": 568, "snp": 0x50}


def _evidence(root: Path, kind: str, quote: bytes | None = None) -> Evidence:
    if kind == "snp":
        raw = bytes.fromhex((root / "snp/report_milan.hex").read_text().strip())
        return Evidence(
            kind="sev-snp",
            quote=quote or raw,
            vcek=(root / "snp/vcek_milan.der").read_bytes(),
            cert_chain=(root / "snp/cert_chain_milan").read_bytes(),
        )
    pytest.importorskip("dcap_qvl", reason="SGX/TDX verification needs dcap-qvl==0.7.0")
    return Evidence(
        kind=f"{kind}-dcap",  # type: ignore[arg-type]
        quote=quote or (root / f"dcap/{kind}_quote").read_bytes(),
        collateral=(root / f"dcap/{kind}_quote_collateral.json").read_text(),
    )


def _vector_report_data(evidence: Evidence, kind: str) -> bytes:
    off = REPORT_DATA_OFFSET[kind]
    return evidence.quote[off : off + 64]


def _policy(kind: str, **overrides: object) -> Policy:
    base: dict[str, object] = {
        "allowed_measurements": [MEASUREMENTS[kind]],
        "accepted_tcb_statuses": ["UpToDate", "ConfigurationAndSWHardeningNeeded"],
    }
    base.update(overrides)
    return Policy.model_validate(base)


@pytest.mark.parametrize("kind", KINDS)
def test_genuine_evidence_verifies_inside_the_collateral_window(
    attestation_dir: Path, kind: str
) -> None:
    # Prepare
    evidence = _evidence(attestation_dir, kind)
    expected = _vector_report_data(evidence, kind)
    # Execute
    quote = Verifier(_policy(kind)).verify(evidence, expected_report_data=expected, now=VECTOR_TIME)
    # Assert
    assert quote.measurement == MEASUREMENTS[kind]
    assert not quote.simulated and not quote.debug
    assert quote.report_data == expected


def test_genuine_tcb_statuses_are_reported(attestation_dir: Path) -> None:
    verifier = Verifier(Policy())
    sgx = verifier.authenticate(_evidence(attestation_dir, "sgx"), VECTOR_TIME)
    tdx = verifier.authenticate(_evidence(attestation_dir, "tdx"), VECTOR_TIME)
    assert sgx.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert set(sgx.advisory_ids) == {"INTEL-SA-00289", "INTEL-SA-00615"}
    assert tdx.tcb_status == "UpToDate"


@pytest.mark.parametrize("kind", KINDS)
def test_flipped_report_data_byte_is_refused(attestation_dir: Path, kind: str) -> None:
    # Prepare
    good = _evidence(attestation_dir, kind)
    raw = bytearray(good.quote)
    raw[REPORT_DATA_OFFSET[kind]] ^= 0x01
    bad = _evidence(attestation_dir, kind, bytes(raw))
    expected = _vector_report_data(bad, kind)  # even if the verifier expects the flipped bytes
    # Execute / Assert
    with pytest.raises(AttestationError, match="signature is invalid"):
        Verifier(_policy(kind)).verify(bad, expected_report_data=expected, now=VECTOR_TIME)


@pytest.mark.parametrize(
    ("kind", "when", "message"),
    [
        ("sgx", VECTOR_TIME + timedelta(days=90), "TCBInfo expired"),
        ("tdx", VECTOR_TIME + timedelta(days=90), "TCBInfo expired"),
        ("snp", VECTOR_TIME.replace(year=2031), "not valid at"),
    ],
)
def test_expired_time_is_refused(attestation_dir: Path, kind: str, when, message: str) -> None:
    evidence = _evidence(attestation_dir, kind)
    with pytest.raises(AttestationError, match=message):
        Verifier(_policy(kind)).verify(
            evidence, expected_report_data=_vector_report_data(evidence, kind), now=when
        )


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_measurement_is_refused(attestation_dir: Path, kind: str) -> None:
    evidence = _evidence(attestation_dir, kind)
    policy = _policy(kind, allowed_measurements=["00" * 32])
    with pytest.raises(AttestationError, match="not in policy.allowed_measurements"):
        Verifier(policy).verify(
            evidence, expected_report_data=_vector_report_data(evidence, kind), now=VECTOR_TIME
        )


@pytest.mark.parametrize("kind", KINDS)
def test_report_data_binding_another_key_is_refused(attestation_dir: Path, kind: str) -> None:
    # The client expects SHA-512(E || n || C) of its own handshake; the quote binds something else.
    evidence = _evidence(attestation_dir, kind)
    _, hello = client_hello()
    expected = report_data(generate_keypair().public, hello.nonce, hello.client_public)
    with pytest.raises(AttestationError, match="binds another key"):
        Verifier(_policy(kind)).verify(evidence, expected_report_data=expected, now=VECTOR_TIME)


@pytest.mark.parametrize("kind", KINDS)
def test_stale_nonce_is_refused(attestation_dir: Path, kind: str) -> None:
    # Prepare: the nonce was issued 301 s before verification, policy allows 300 s.
    evidence = _evidence(attestation_dir, kind)
    verifier = Verifier(_policy(kind, max_nonce_age_s=300))
    nonce = verifier.issue_nonce(VECTOR_TIME - timedelta(seconds=301))
    # Execute / Assert
    with pytest.raises(AttestationError, match="stale"):
        verifier.verify(
            evidence,
            expected_report_data=_vector_report_data(evidence, kind),
            nonce=nonce,
            now=VECTOR_TIME,
        )


def test_strict_default_policy_refuses_sgx_vector_tcb_status(attestation_dir: Path) -> None:
    evidence = _evidence(attestation_dir, "sgx")
    policy = Policy(allowed_measurements=[MEASUREMENTS["sgx"]])
    with pytest.raises(AttestationError, match="ConfigurationAndSWHardeningNeeded"):
        Verifier(policy).verify(
            evidence, expected_report_data=_vector_report_data(evidence, "sgx"), now=VECTOR_TIME
        )


def test_snp_minimum_tcb_and_untrusted_ark_are_refused(attestation_dir: Path) -> None:
    evidence = _evidence(attestation_dir, "snp")
    expected = _vector_report_data(evidence, "snp")
    policy = _policy("snp", min_snp_tcb=SnpTcb(snp=9))
    with pytest.raises(AttestationError, match="below policy.min_snp_tcb.snp=9"):
        Verifier(policy).verify(evidence, expected_report_data=expected, now=VECTOR_TIME)
    untrusting = _policy("snp", amd_ark_fingerprints=["11" * 32])
    with pytest.raises(AttestationError, match="not a trusted AMD root"):
        Verifier(untrusting).verify(evidence, expected_report_data=expected, now=VECTOR_TIME)


def test_snp_broken_chain_and_sgx_evidence_labelled_tdx_are_refused(attestation_dir: Path) -> None:
    snp = _evidence(attestation_dir, "snp")
    vcek_only = Evidence(kind="sev-snp", quote=snp.quote, vcek=snp.vcek, cert_chain=b"")
    with pytest.raises(AttestationError, match="cert_chain|malformed"):
        Verifier(_policy("snp")).authenticate(vcek_only, VECTOR_TIME)
    with pytest.raises(AttestationError, match="expected 1184"):
        Verifier(_policy("snp")).authenticate(
            Evidence(
                kind="sev-snp", quote=snp.quote[:-1], vcek=snp.vcek, cert_chain=snp.cert_chain
            ),
            VECTOR_TIME,
        )
    sgx = _evidence(attestation_dir, "sgx")
    mislabeled = Evidence(kind="tdx-dcap", quote=sgx.quote, collateral=sgx.collateral)
    with pytest.raises(AttestationError):
        Verifier(Policy()).authenticate(mislabeled, VECTOR_TIME)


def test_dcap_without_collateral_is_refused(attestation_dir: Path) -> None:
    quote = (attestation_dir / "dcap/tdx_quote").read_bytes()
    with pytest.raises(AttestationError, match="no collateral"):
        Verifier(Policy()).authenticate(Evidence(kind="tdx-dcap", quote=quote), VECTOR_TIME)


def test_evidence_json_round_trip_and_strict_parse(attestation_dir: Path) -> None:
    evidence = _evidence(attestation_dir, "snp")
    assert Evidence.from_json(evidence.to_json()) == evidence
    for bad in [
        "[]",
        "{",
        '{"kind": "tpm", "quote": "AA=="}',
        '{"kind": "sgx-dcap", "x": 1}',
        '{"kind": "sgx-dcap", "quote": "@@"}',
    ]:
        with pytest.raises(AttestationError):
            Evidence.from_json(bad)


# --------------------------------------------------------------------------- simulated quotes

PLATFORM = Ed25519PrivateKey.generate()
PLATFORM_HEX = PLATFORM.public_key().public_bytes_raw().hex()
MEASUREMENT = "ab" * 32


def _sim_policy(**overrides: object) -> Policy:
    base: dict[str, object] = {
        "allow_simulated": True,
        "simulated_platform_keys": [PLATFORM_HEX],
        "allowed_measurements": [MEASUREMENT],
    }
    base.update(overrides)
    return Policy.model_validate(base)


def _sim_handshake(verifier: Verifier, now: int, **sign_kwargs: object):
    keys, hello = client_hello()
    nonce = verifier.issue_nonce(now)
    hello = type(hello)(client_public=hello.client_public, nonce=nonce)
    enclave_public, rd, _ = enclave_accept(hello)
    kwargs: dict[str, object] = {
        "measurement": MEASUREMENT,
        "report_data": rd,
        "nonce": nonce,
        "timestamp": now,
        "program": "echo",
    }
    kwargs.update(sign_kwargs)
    evidence = sign_simulated_quote(PLATFORM, **kwargs)  # type: ignore[arg-type]
    return hello, enclave_public, evidence


def test_simulated_quote_verifies_when_explicitly_allowed() -> None:
    now = unix_time(VECTOR_TIME)
    verifier = Verifier(_sim_policy())
    hello, enclave_public, evidence = _sim_handshake(verifier, now)
    quote = verifier.verify_channel(evidence, hello=hello, enclave_public=enclave_public, now=now)
    assert quote.simulated and quote.measurement == MEASUREMENT
    assert b'"simulated":true' in evidence.quote


def test_strict_policy_refuses_simulated_quote() -> None:
    now = unix_time(VECTOR_TIME)
    verifier = Verifier(Policy(allowed_measurements=[MEASUREMENT]))
    hello, enclave_public, evidence = _sim_handshake(verifier, now)
    with pytest.raises(AttestationError, match="SIMULATED.*allow_simulated is false"):
        verifier.verify_channel(evidence, hello=hello, enclave_public=enclave_public, now=now)


def test_simulated_quote_nonce_is_single_use() -> None:
    now = unix_time(VECTOR_TIME)
    verifier = Verifier(_sim_policy())
    hello, enclave_public, evidence = _sim_handshake(verifier, now)
    verifier.verify_channel(evidence, hello=hello, enclave_public=enclave_public, now=now)
    with pytest.raises(AttestationError, match="already used"):
        verifier.verify_channel(evidence, hello=hello, enclave_public=enclave_public, now=now)


@pytest.mark.parametrize(
    ("policy_kw", "sign_kw", "message"),
    [
        ({"simulated_platform_keys": []}, {}, "not in policy.simulated_platform_keys"),
        ({}, {"debug": True}, "DEBUG"),
        ({}, {"timestamp": unix_time(VECTOR_TIME) - 1000}, "max_quote_age_s"),
        ({}, {"nonce": b"\x00" * 32}, "another nonce"),
        ({}, {"measurement": "cd" * 32}, "allowed_measurements"),
    ],
    ids=["untrusted-platform", "debug", "old-quote", "other-nonce", "measurement"],
)
def test_simulated_quote_refusals(policy_kw: dict, sign_kw: dict, message: str) -> None:
    now = unix_time(VECTOR_TIME)
    verifier = Verifier(_sim_policy(**policy_kw))
    hello, enclave_public, evidence = _sim_handshake(verifier, now, **sign_kw)
    with pytest.raises(AttestationError, match=message):
        verifier.verify_channel(evidence, hello=hello, enclave_public=enclave_public, now=now)


def test_tampered_simulated_quote_is_refused() -> None:
    now = unix_time(VECTOR_TIME)
    verifier = Verifier(_sim_policy())
    hello, enclave_public, evidence = _sim_handshake(verifier, now)
    forged = Evidence(
        kind="simulated", quote=evidence.quote.replace(b'"debug":false', b'"debug":true')
    )
    with pytest.raises(AttestationError, match="signature is invalid"):
        verifier.verify_channel(forged, hello=hello, enclave_public=enclave_public, now=now)


def test_nonce_registry_refuses_unknown_nonces() -> None:
    with pytest.raises(AttestationError, match="not issued"):
        NonceRegistry().consume(b"\x01" * 32, 0)


def test_policy_rejects_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Policy.from_dict({"allow_simulted": True, "allowed_measurements": ["zz"]})
    assert len(info.value.problems) == 2
    assert "allow_simulted" in str(info.value) and "not hex" in str(info.value)
    path = tmp_path / "policy.yaml"
    path.write_text("allow_simulated: true\nallowed_measurements: [AB]\n")
    assert Policy.load(path).allowed_measurements == ["ab"]
    assert Policy().allow_simulated is False and Policy().allow_debug is False


# Identity claims besides the measurement, as the genuine vectors report them.
VECTOR_CLAIMS = {
    "tdx": {
        "rt_mr1": "0084452c01668329d4bc06acdf58a7205c26743304509973949e5619bf81a6a7"
        "aea8c323c173019b3093d54e579e9378",
        "rt_mr2": "d833feef2cd945148aa38ead2c53e9b7f138190aaaebfc551dccd829fc207aa3"
        "ba80b70870d7330733642e01d48c3132",
    },
    "snp": {"host_data": "00" * 32, "vmpl": "0"},
    "sgx": {"mr_signer": "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"},
}


def _verify_claims(root: Path, kind: str, claims: dict[str, list[str]]):
    evidence = _evidence(root, kind)
    return Verifier(_policy(kind, allowed_claims=claims)).verify(
        evidence, expected_report_data=_vector_report_data(evidence, kind), now=VECTOR_TIME
    )


@pytest.mark.parametrize("kind", KINDS)
def test_pinned_claims_of_genuine_evidence_verify_and_another_value_is_refused(
    attestation_dir: Path, kind: str
) -> None:
    # Prepare: the vector's own values (upper-case hex is the same claim)
    claims = {name: [value.upper(), "11" * 4] for name, value in VECTOR_CLAIMS[kind].items()}
    # Execute / Assert: its values pass...
    quote = _verify_claims(attestation_dir, kind, claims)
    assert {name: quote.details[name] for name in claims} == VECTOR_CLAIMS[kind]
    # ... and a policy that lists only another value for one claim refuses, naming it
    name = next(iter(claims))
    other = "1" if name == "vmpl" else "ab" * (len(VECTOR_CLAIMS[kind][name]) // 2)
    with pytest.raises(AttestationError, match=f"{name}=.* is not in policy.allowed_claims.{name}"):
        _verify_claims(attestation_dir, kind, {**claims, name: [other]})


@pytest.mark.parametrize(("kind", "claim"), [("sgx", "rt_mr2"), ("tdx", "host_data")])
def test_a_claim_the_evidence_does_not_report_is_refused(
    attestation_dir: Path, kind: str, claim: str
) -> None:
    with pytest.raises(AttestationError, match=f"does not report {claim}"):
        _verify_claims(attestation_dir, kind, {claim: ["00" * 32]})


def test_simulated_quote_is_refused_under_a_policy_pinning_an_rtmr() -> None:
    now = unix_time(VECTOR_TIME)
    verifier = Verifier(_sim_policy(allowed_claims={"rt_mr2": ["00" * 48]}))
    hello, enclave_public, evidence = _sim_handshake(verifier, now)
    with pytest.raises(AttestationError, match="simulated evidence does not report rt_mr2"):
        verifier.verify_channel(evidence, hello=hello, enclave_public=enclave_public, now=now)


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"rtmr1": ["00"]}, "unknown claim 'rtmr1'"),
        ({"rt_mr1": []}, "is empty"),
        ({"host_data": ["zz"]}, "not hex"),
        ({"vmpl": ["0x1"]}, "must be decimal"),
    ],
)
def test_policy_refuses_unknown_empty_or_malformed_claims(claims: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Policy.from_dict({"allowed_claims": claims})
