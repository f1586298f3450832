"""Plain and secure FedAvg rounds on Flower with fake trainers: equality, audit, faults."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedkit import FakeTrainer, client_policy, fake_trainers, run_rounds

from shieldtune.data import accuracy, confusion_matrix, macro_f1
from shieldtune.federated.codec import from_array_record


def _expected_round(base: torch.Tensor, weights=(10, 20, 30)) -> torch.Tensor:
    # client p adds p + 1; FedAvg weights by 10 * (p + 1)
    return base + sum(w * (p + 1) for p, w in enumerate(weights)) / sum(weights)


def test_plain_fedavg_rounds_average_by_sample_count():
    # Prepare
    trainer_for, built = fake_trainers()
    # Execute
    events, result, _ = run_rounds(trainer_for, rounds=2)
    # Assert: round 1 from zeros, round 2 from round 1's global
    glob = from_array_record(result.arrays)
    r1 = _expected_round(torch.zeros(2, 3))
    torch.testing.assert_close(glob["w"], _expected_round(r1))
    agg = [e for e in events if e["kind"] == "aggregated"]
    assert [e["round"] for e in agg] == [1, 2]
    assert agg[0]["train_loss"] == pytest.approx((0 * 10 + 1 * 20 + 2 * 30) / 60)
    evals = [e for e in events if e["kind"] == "eval"]
    assert evals[0]["accuracy"] == pytest.approx(float(r1.mean()))
    assert all(t.seen[0]["w"].abs().sum() == 0 for t in built.values())  # shared init


def test_secure_fedavg_equals_plain_fedavg_and_host_never_sees_adapters(enclave_factory):
    # Prepare
    plain_for, _ = fake_trainers()
    secure_for, built = fake_trainers()
    enclave, audit = enclave_factory()
    on_wire: list[str] = []

    def tap(msg):
        if msg.has_content():
            for rec in msg.content.array_records.values():
                on_wire.extend(str(a.numpy().dtype) for a in rec.values())

    # Execute
    _, plain_result, _ = run_rounds(plain_for, rounds=2)
    events, _, _ = run_rounds(secure_for, rounds=2, enclave=enclave, tap=tap)
    # Assert: the global adapter the clients received in the last evaluate equals plain's
    plain = from_array_record(plain_result.arrays)
    for trainer in built.values():
        received = trainer.seen[-1]
        for name in plain:
            torch.testing.assert_close(received[name], plain[name], atol=1e-6, rtol=0)
    assert [e["round"] for e in events if e["kind"] == "aggregated"] == [1, 2]
    # Flower carried only ciphertext, the enclave pipe only encrypted records or no tensors
    assert set(on_wire) == {"uint8"}
    for name in ("w", "b", "g:*", "u:*", "*w", "*b"):
        audit.assert_nothing_clear(name)
    clear = {t.name for c in audit.records if c.protection == "clear" for t in c.tensors}
    assert clear <= {"config", "sealing_key", "hello", "enclave_public", "report_data"}
    assert enclave.call("status").meta["round"] == 2


def test_client_that_raises_is_dropped_and_round_completes():
    trainer_for, _ = fake_trainers({2: {1: "raise"}})
    events, result, _ = run_rounds(trainer_for, rounds=2)
    dropped = [e for e in events if e["kind"] == "dropped"]
    assert dropped and "client crashed mid-round" in dropped[0]["reason"]
    agg = [e for e in events if e["kind"] == "aggregated"]
    assert agg[0] == {**agg[0], "round": 1, "accepted": 2}
    # round 1 = weighted mean of clients 0 and 1 only: (10*1 + 20*2) / 30
    r1 = torch.full((2, 3), 50 / 30)
    torch.testing.assert_close(from_array_record(result.arrays)["w"], _expected_round(r1))


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_client_that_times_out_is_dropped(enclave_factory, secure):
    enclave = enclave_factory()[0] if secure else None
    trainer_for, built = fake_trainers({1: {1: "hang"}})
    events, _, _ = run_rounds(trainer_for, rounds=2, enclave=enclave, timeout=2.0, workers=4)
    agg = [e for e in events if e["kind"] == "aggregated"]
    assert [a["accepted"] for a in agg] == [2, 3]  # node 1 back in round 2 after a new handshake
    dropped = [e for e in events if e["kind"] == "dropped"]
    assert [(e["round"], e["node"], e["reason"]) for e in dropped] == [
        (1, 1001, "no reply in time")
    ]
    r1 = torch.full((2, 3), (10 * 1 + 30 * 3) / 40)
    torch.testing.assert_close(built[0].seen[-1]["w"], _expected_round(r1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fault", ["nan", "shape", "huge"])
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_bad_update_is_refused_without_poisoning(enclave_factory, fault, secure):
    enclave = enclave_factory()[0] if secure else None
    trainer_for, built = fake_trainers({0: {1: fault}})
    events, _, _ = run_rounds(trainer_for, rounds=1, enclave=enclave)
    refused = [e for e in events if e["kind"] == "refused"]
    words = {"nan": "NaN", "shape": "shape", "huge": "oversized"}
    assert len(refused) == 1 and words[fault] in refused[0]["reason"]
    # the aggregate is the mean of clients 1 and 2 only
    expected = torch.full((2, 3), (20 * 2 + 30 * 3) / 50)
    torch.testing.assert_close(built[1].seen[-1]["w"], expected, atol=1e-6, rtol=0)
    assert np.isfinite(built[1].seen[-1]["w"].numpy()).all()


def test_client_whose_attestation_fails_is_refused(enclave_factory):
    enclave, _ = enclave_factory()
    strict = client_policy(enclave, allow_simulated=False)
    wrong = client_policy(enclave, allowed_measurements=["00" * 32])

    def policy_for(n: int):
        return {0: strict, 1: wrong}.get(n, client_policy(enclave))

    trainer_for, built = fake_trainers()
    events, _, _ = run_rounds(trainer_for, rounds=1, enclave=enclave, policy_for=policy_for)
    refused = [e for e in events if e["kind"] == "refused_client"]
    assert len(refused) == 2
    assert any("simulated" in e["reason"] for e in refused)
    assert any("measurement" in e["reason"] for e in refused)
    # only one client verified the enclave: below min_clients, nothing was aggregated
    assert [e["kind"] for e in events if e["kind"] in ("aggregated", "round_failed")] == [
        "round_failed"
    ]


def test_tampered_record_is_refused_by_the_enclave(enclave_factory):
    enclave, _ = enclave_factory()
    trainer_for, _ = fake_trainers()

    def tap(msg):  # a network attacker flips a byte of node 1001's train reply
        if msg.metadata.src_node_id == 1001 and msg.metadata.message_type == "train":
            arr = msg.content["sealed"]["r000"]
            data = bytearray(arr.data)
            data[-1] ^= 1
            arr.__dict__["data"] = bytes(data)

    events, _, _ = run_rounds(trainer_for, rounds=1, enclave=enclave, tap=tap)
    refused = [e for e in events if e["kind"] == "refused_client"]
    assert len(refused) == 1 and refused[0]["node"] == 1001
    assert "channel" in refused[0]["reason"]
    assert [e["accepted"] for e in events if e["kind"] == "aggregated"] == [2]


def test_fedavg_enclave_runs_only_measured_code(enclave_factory):
    from shieldtune.tee.program import measured_modules

    enclave, _ = enclave_factory()
    # the program has no "info" ECALL; a refused call names the accepted ones
    with pytest.raises(Exception, match="aggregate, fetch, status, submit"):
        enclave.call("info")
    measured = set(measured_modules("fedavg"))
    assert {"shieldtune.federated.aggregate", "shieldtune.federated.enclave_program"} <= measured
    assert not any(
        m.startswith(("flwr", "shieldtune.models", "shieldtune.adapters")) for m in measured
    )


def test_restarted_server_enclave_resumes_from_sealed_state(enclave_factory, tmp_path):
    # Prepare: two rounds, then the enclave's state is sealed and the enclave stopped
    enclave, _ = enclave_factory()
    trainer_for, built = fake_trainers()
    run_rounds(trainer_for, rounds=2, enclave=enclave)
    sealed = tmp_path / "server.sealed"
    assert enclave.seal(sealed) == 1
    before = built[0].seen[-1]
    enclave.stop()
    # Execute: a new enclave process unseals and the federation goes on for one more round
    again, _ = enclave_factory()
    again.unseal(sealed)
    trainer_for, built = fake_trainers()
    events, _, _ = run_rounds(trainer_for, rounds=1, enclave=again)
    # Assert: round 3 started from round 2's global adapter (no update lost or applied twice)
    assert built[0].seen[0]["w"].tolist() == before["w"].tolist()
    assert [e["round"] for e in events if e["kind"] == "aggregated"] == [1]
    assert again.call("status").meta["round"] == 3


def test_mixed_plain_and_secure_parties_refuse_each_other(enclave_factory):
    from shieldtune.federated.client_app import build_client_app
    from shieldtune.federated.mods import SealedUpdateMod
    from shieldtune.federated.secure import EnclaveAggregation
    from shieldtune.federated.server_app import build_server_app
    from shieldtune.federated.simulation import run_simulation
    from shieldtune.federated.strategy import ValidatedFedAvg
    from shieldtune.tee.attestation import Verifier

    enclave, _ = enclave_factory()
    # a secure client never answers a plain server (its update would leave in the clear)
    events: list[dict] = []
    trainer_for, built = fake_trainers()
    mod = SealedUpdateMod(lambda: Verifier(client_policy(enclave)))
    server = build_server_app(ValidatedFedAvg(2, on_event=events.append), 1, 30.0)
    run_simulation(server, build_client_app(trainer_for, [mod]), 2)
    assert {e["kind"] for e in events} == {"dropped", "round_failed"}
    assert all("ChannelError" in e["reason"] for e in events if e["kind"] == "dropped")
    assert all(not t.seen for t in built.values())  # the plain function never ran
    # a plain client cannot join a secure server
    events = []
    strategy = EnclaveAggregation(ValidatedFedAvg(2, on_event=events.append), enclave)
    run_simulation(build_server_app(strategy, 1, 30.0), build_client_app(fake_trainers()[0]), 2)
    refused = [e for e in events if e["kind"] == "refused_client"]
    assert {e["node"] for e in refused} == {1000, 1001}
    assert all("plain-fedavg" in e["reason"] for e in refused)


# Each client's test share: (labels, predictions). Class 2 is absent from client 0's share and
# client 2 predicts only class 0, so the mean of the shares' macro-F1 differs from the whole's.
SHARES = {
    0: ([0, 0, 1, 1], [0, 1, 1, 1]),
    1: ([2, 2, 0, 1, 2, 0], [2, 0, 0, 1, 2, 2]),
    2: ([0, 1, 2], [0, 0, 0]),
}


class ScoringTrainer(FakeTrainer):
    """Evaluates to fixed predictions on its share: the metrics a real client sends."""

    def __init__(self, partition: int, malformed: bool = False) -> None:
        super().__init__(partition)
        self.malformed = malformed

    def evaluate(self, state, config):
        labels, preds = SHARES[self.partition]
        flat = [n for row in confusion_matrix(preds, labels, 3) for n in row]
        if self.malformed:
            flat[0] += 1  # counts no longer sum to the share's rows
        metrics = {
            "accuracy": accuracy(preds, labels),
            "macro_f1": macro_f1(preds, labels, 3),
            "confusion": flat,
        }
        return len(labels), metrics


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure"])
def test_macro_f1_is_scored_on_the_whole_test_split(enclave_factory, secure):
    enclave = enclave_factory()[0] if secure else None
    events, _, _ = run_rounds(
        lambda ctx: ScoringTrainer(int(ctx.node_config["partition-id"])), rounds=1, enclave=enclave
    )
    (ev,) = [e for e in events if e["kind"] == "eval"]
    labels = [y for ys, _ in SHARES.values() for y in ys]
    preds = [p for _, ps in SHARES.values() for p in ps]
    n = len(labels)
    client_mean = sum(macro_f1(ps, ys, 3) * len(ys) for ys, ps in SHARES.values()) / n
    assert ev["macro_f1"] == pytest.approx(macro_f1(preds, labels, 3))
    assert ev["macro_f1_client_mean"] == pytest.approx(client_mean)
    assert abs(ev["macro_f1"] - client_mean) > 0.02  # the two really differ here (0.025)
    assert ev["accuracy"] == pytest.approx(accuracy(preds, labels))  # a mean over rows: exact
    assert "confusion" not in ev


def test_a_malformed_confusion_matrix_falls_back_to_the_client_mean():
    def trainer_for(ctx):
        p = int(ctx.node_config["partition-id"])
        return ScoringTrainer(p, malformed=p == 1)

    events, _, _ = run_rounds(trainer_for, rounds=1)
    (ev,) = [e for e in events if e["kind"] == "eval"]
    n = sum(len(ys) for ys, _ in SHARES.values())
    client_mean = sum(macro_f1(ps, ys, 3) * len(ys) for ys, ps in SHARES.values()) / n
    assert ev["macro_f1"] == pytest.approx(client_mean)
    assert "macro_f1_client_mean" not in ev and "confusion" not in ev
