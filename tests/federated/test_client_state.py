"""The secure client keeps its per-node state in Flower's ``Context.state`` only.

A Flower 1.42 SuperNode runs every message in a fresh ClientApp process and stores the node's
context between messages. Here every message gets a new ClientApp and a new
``SealedUpdateMod``, and the context state is round-tripped through Flower's protobuf after
each message, as the SuperNode does: the secure run must still equal the plain one. Wiping the
state between messages must break it (so the state is really what carries the session).
"""

from __future__ import annotations

import pytest
import torch
from fedkit import client_policy, fake_trainers, run_rounds
from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from shieldtune.federated.client_app import build_client_app
from shieldtune.federated.codec import from_array_record
from shieldtune.federated.mods import CHANNEL_KEY, SealedUpdateMod
from shieldtune.federated.secure import EnclaveAggregation
from shieldtune.federated.server_app import build_server_app
from shieldtune.federated.simulation import run_simulation
from shieldtune.federated.strategy import ValidatedFedAvg
from shieldtune.tee.attestation import Verifier


class FreshProcessPerMessage:
    """A ClientApp stand-in: a new app and mod per message, the state serialised in between."""

    def __init__(self, trainer_for, policy, keep_state: bool = True) -> None:
        self.trainer_for, self.policy, self.keep_state = trainer_for, policy, keep_state
        self.apps = 0

    def __call__(self, msg, ctx):
        kept = recorddict_from_proto(recorddict_to_proto(ctx.state))
        ctx.state = kept if self.keep_state else RecordDict()
        app = build_client_app(self.trainer_for, [SealedUpdateMod(lambda: Verifier(self.policy))])
        self.apps += 1
        reply = app(msg, ctx)
        ctx.state = recorddict_from_proto(recorddict_to_proto(ctx.state))
        return reply


def _secure(enclave, client, rounds=2):
    events: list[dict] = []
    strategy = EnclaveAggregation(ValidatedFedAvg(2, on_event=events.append), enclave)
    grid = run_simulation(build_server_app(strategy, rounds, 60.0), client, 3)
    return events, grid


def test_sessions_survive_a_fresh_app_per_message(enclave_factory):
    # Prepare
    enclave, _ = enclave_factory()
    plain_for, _ = fake_trainers()
    secure_for, built = fake_trainers()
    client = FreshProcessPerMessage(secure_for, client_policy(enclave))
    # Execute
    _, plain_result, _ = run_rounds(plain_for, rounds=2)
    events, grid = _secure(enclave, client)
    # Assert: one handshake per node, then sealed rounds; the same aggregate as plain FedAvg
    assert [e["round"] for e in events if e["kind"] == "aggregated"] == [1, 2]
    assert not [e for e in events if e["kind"] in ("refused_client", "dropped", "refused")]
    kinds = [t.message_type for t in grid.traffic if t.direction == "to_client"]
    assert kinds.count("query.shieldtune_hello") == 3 and client.apps == len(kinds)
    plain = from_array_record(plain_result.arrays)
    for trainer in built.values():  # each the trainer of that node's last message
        for name in plain:
            torch.testing.assert_close(trainer.seen[-1][name], plain[name], atol=1e-6, rtol=0)
    for ctx in grid.contexts.values():  # the session and its counters live in the context
        rec = ctx.state[CHANNEL_KEY]
        # sent: fetch (connect), submit + fetch, fetch (round 1), the same in round 2;
        # received: the global adapter (train), submit answer + global adapter (evaluate)
        assert (rec["send_seq"], rec["recv_seq"], rec["global_round"]) == (7, 6, 2)


def test_without_the_context_state_the_client_cannot_continue(enclave_factory):
    enclave, _ = enclave_factory()
    secure_for, built = fake_trainers()
    client = FreshProcessPerMessage(secure_for, client_policy(enclave), keep_state=False)
    events, _ = _secure(enclave, client, rounds=1)
    refused = [e for e in events if e["kind"] == "refused_client"]
    # each node is refused at the training and again at the evaluation handshake
    assert sorted(e["node"] for e in refused) == [1000, 1000, 1001, 1001, 1002, 1002]
    assert all("connect without a hello" in e["reason"] for e in refused)
    assert [e["kind"] for e in events if e["kind"] in ("aggregated", "round_failed")] == [
        "round_failed"
    ]
    assert not built  # no trainer ever ran: nothing left the clients


@pytest.mark.parametrize("field", ["send_key", "recv_seq"])
def test_a_corrupted_stored_session_is_refused(enclave_factory, field):
    enclave, _ = enclave_factory()
    secure_for, _ = fake_trainers()
    client = FreshProcessPerMessage(secure_for, client_policy(enclave))
    calls = {"n": 0}

    def corrupting(msg, ctx):
        if msg.metadata.message_type == "evaluate" and CHANNEL_KEY in ctx.state:
            rec = ctx.state[CHANNEL_KEY]
            rec[field] = bytes(32) if field == "send_key" else int(rec[field]) + 1
            calls["n"] += 1
        return client(msg, ctx)

    events, _ = _secure(enclave, corrupting, rounds=2)
    assert calls["n"] == 6
    if field == "recv_seq":
        # the client cannot open the evaluate records with a wrong counter: it answers with an
        # error (dropped from the evaluation); training re-handshakes and goes on
        dropped = [e for e in events if e["kind"] == "dropped"]
        assert [e["round"] for e in dropped] == [1, 1, 1, 2, 2, 2]
        assert all("replayed record" in e["reason"] for e in dropped)
        assert [e["round"] for e in events if e["kind"] == "aggregated"] == [1, 2]
    else:
        # records sealed with a wrong key: the enclave refuses them (the fetch relayed in round 2)
        refused = [e for e in events if e["kind"] == "refused_client"]
        assert [e["round"] for e in refused] == [2, 2, 2]
        assert all("failed authentication" in e["reason"] for e in refused)
        assert [e["round"] for e in events if e["kind"] == "round_failed"] == [2]
