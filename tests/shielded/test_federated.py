"""shielded-fedavg: Method 1 parties federated through the server enclave (Flower, in-process).

Each client's adapter lives in its own ``shielded-party`` enclave, whose end of the channel to
the server's ``fedavg`` enclave runs in there: the client host relays ciphertext only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny import table_overrides

from shieldtune.config import load_config
from shieldtune.crypto.framing import bytes_to_tensor
from shieldtune.errors import AttestationError, ChannelError, IntegrityError
from shieldtune.federated.deploy import client_policy, enclave_config
from shieldtune.federated.mods import PartySealedMod
from shieldtune.recipes import RECIPES
from shieldtune.recipes.shielded import open_party, party_config
from shieldtune.tee.attestation import Policy
from shieldtune.tee.audit import AuditLog
from shieldtune.tee.enclave import create_enclave

pytestmark = pytest.mark.integration


def _cfg(out: Path, table: Path, mode: str, *extra: str):
    return load_config(
        None,
        [
            *table_overrides(table),
            f"mode={mode}",
            "model.name=tiny-llama",
            "data.max_length=24",
            "data.max_train_examples=48",
            "data.max_test_examples=16",
            "adapter={method: lora, rank: 4, dropout: 0.0}",
            "train.batch_size=8",
            "train.lr=0.003",
            "federated.num_clients=2",
            "federated.min_clients=2",
            "federated.rounds=2",
            "federated.allow_simulated=true",
            "shielded.allow_simulated=true",
            f"output_dir={out}",
            f"run_name={mode}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, keyword_table, platform_key):
    """plain-fedavg and shielded-fedavg with the same seeds, data and partition."""
    out = tmp_path_factory.mktemp("runs")
    return {
        mode: RECIPES[mode](_cfg(out, keyword_table, mode))
        for mode in ("plain-fedavg", "shielded-fedavg")
    }


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_shielded_fedavg_tracks_plain_fedavg(runs):
    plain, shielded = _summary(runs["plain-fedavg"]), _summary(runs["shielded-fedavg"])
    assert shielded["mode"] == "shielded-fedavg" and len(shielded["history"]) == 2
    for p, s in zip(plain["history"], shielded["history"], strict=True):
        # fixed-point offload: the same rounds up to the encoding error, not bit for bit
        assert s["loss"] == pytest.approx(p["loss"], rel=1e-3)
        assert abs(s["accuracy"] - p["accuracy"]) <= 1 / 16  # at most one of 16 test rows
        assert "macro_f1_client_mean" in s  # macro-F1 from the parties' summed matrices
    assert shielded["history"][-1]["loss"] < shielded["history"][0]["loss"] * 1.05


def test_no_adapter_and_no_operand_crosses_in_the_clear(runs):
    run = runs["shielded-fedavg"]
    summary = _summary(run)
    assert summary["accelerator_crossings"] > 0
    assert all("simulated" in t for t in summary["party_tee"])
    for part in (0, 1):  # every operand either accelerator saw was one-time-padded
        seen = AuditLog.read_jsonl(run / f"accelerator_audit_{part}.jsonl")
        assert seen and all(c.protection == "masked" for c in seen)
        host = AuditLog.read_jsonl(run / f"party_audit_{part}.jsonl")
        clear = {t.name for c in host if c.protection == "clear" for t in c.tensors}
        assert not any("lora" in n or n.startswith("record.") for n in clear), clear
        assert any(c.call == "channel_call" for c in host)
    server = AuditLog.read_jsonl(run / "audit.jsonl")
    clear = {t.name for c in server if c.protection == "clear" for t in c.tensors}
    assert clear <= {"config", "sealing_key", "hello", "enclave_public", "report_data"}
    # the adapter is kept sealed to the party's enclave, never written in the clear
    assert (run / "adapter" / "adapter.sealed").is_file()
    assert not list((run / "adapter").glob("*.safetensors"))


def test_shielded_fedavg_trains_a_prefix_on_a_bert_like_plain_fedavg(
    tmp_path, keyword_table, platform_key
):
    # Prepare: the paper grid's Method 1 P-tuning v2 row in small: a BERT-family model (as
    # minilm), a P-tuning v2 prefix, 12-bit weights, every product checked, a pool of 1
    extra = [
        "model.name=tiny-bert",
        "adapter={method: prefix, num_virtual_tokens: 4}",
        "train.lr=0.005",
        "federated.rounds=1",
        "shielded.check_rate=1.0",
        "shielded.pool_size=1",
    ]
    # Execute
    runs = {
        mode: RECIPES[mode](_cfg(tmp_path, keyword_table, mode, *extra))
        for mode in ("plain-fedavg", "shielded-fedavg")
    }
    # Assert: the same round up to the encoding error (12-bit weights on a random tiny BERT,
    # whose weights spread wider than a trained model's: under 1 % here)
    plain, shielded = (_summary(runs[m])["history"] for m in ("plain-fedavg", "shielded-fedavg"))
    assert len(shielded) == len(plain) == 1
    assert shielded[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-2)
    assert shielded[0]["loss"] != plain[0]["loss"]  # it did run on fixed point
    assert abs(shielded[0]["accuracy"] - plain[0]["accuracy"]) <= 1 / 16
    # the prefix never crossed in the clear, every operand was padded
    run = runs["shielded-fedavg"]
    for part in (0, 1):
        assert all(
            c.protection == "masked"
            for c in AuditLog.read_jsonl(run / f"accelerator_audit_{part}.jsonl")
        )
        host = AuditLog.read_jsonl(run / f"party_audit_{part}.jsonl")
        clear = {t.name for c in host if c.protection == "clear" for t in c.tensors}
        assert not any("prefix" in n or n.startswith("record.") for n in clear), clear
    assert (run / "adapter" / "adapter.sealed").is_file()


def _server_and_party(cfg, platform_key: Path, trusted: bool):
    """A started ``fedavg`` enclave and (to enter) a party whose measured policy trusts it,
    or trusts only another measurement."""
    server = create_enclave(
        "simulated", "fedavg", enclave_config(cfg), platform_key=platform_key, memory_budget_mb=8
    ).start()
    policy: Policy = client_policy(cfg, [server.platform.public_key_hex])
    if not trusted:
        policy = policy.model_copy(update={"allowed_measurements": ["00" * 32]})
    config = party_config(cfg, 2, 6, policy.model_dump_json())
    return server, open_party({**config, "offload": False}, allow_simulated=True)


def test_party_refuses_a_server_enclave_outside_its_policy(tmp_path, keyword_table, platform_key):
    cfg = _cfg(tmp_path, keyword_table, "shielded-fedavg")
    server, opening = _server_and_party(cfg, platform_key, trusted=False)
    try:
        with opening as party:
            hello = party.call("fed_hello").tensors["hello"]
            _, server_hello = server.open_channel(hello.numpy().tobytes())
            with pytest.raises(AttestationError):
                party.call("fed_connect", tensors={"server_hello": bytes_to_tensor(server_hello)})
            with pytest.raises(ChannelError, match="handshake first"):  # nothing was derived
                party.call("fed_seal", {"submit": True, "num_examples": 8.0})
    finally:
        server.stop()


def test_party_drops_the_session_on_a_tampered_record(tmp_path, keyword_table, platform_key):
    cfg = _cfg(tmp_path, keyword_table, "shielded-fedavg")
    server, opening = _server_and_party(cfg, platform_key, trusted=True)
    try:
        with opening as party:
            hello = party.call("fed_hello").tensors["hello"]
            sid, server_hello = server.open_channel(hello.numpy().tobytes())
            reply = party.call(
                "fed_connect", tensors={"server_hello": bytes_to_tensor(server_hello)}
            )
            fetched = server.relay(sid, reply.tensors["record.0"].numpy().tobytes())
            bad = bytearray(fetched)
            bad[-1] ^= 1
            with pytest.raises(ChannelError):
                party.call("fed_open", tensors={"record.0": bytes_to_tensor(bytes(bad))})
            with pytest.raises(ChannelError, match="handshake first"):
                party.call("fed_open", tensors={"record.0": bytes_to_tensor(fetched)})
    finally:
        server.stop()


def test_party_mod_refuses_a_clear_update_on_the_host():
    mod = PartySealedMod(lambda ctx: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(IntegrityError, match="clear adapter update"):
        mod.seal(None, None, {"lora_A": torch.zeros(2)}, 8.0)  # type: ignore[arg-type]
