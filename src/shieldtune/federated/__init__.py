"""Federated fine-tuning on Flower: plain FedAvg and FedAvg aggregated inside a server enclave.

Modules (import them directly; this package imports nothing heavy, because
:mod:`~shieldtune.federated.aggregate` and :mod:`~shieldtune.federated.enclave_program` also run
inside the enclave process, where every module loaded is part of the measurement):

- :mod:`~shieldtune.federated.aggregate`: pure functions: validation of updates, weighted FedAvg of
  adapter state dicts, SPF sparse-delta averaging.
- :mod:`~shieldtune.federated.strategy`: ``ValidatedFedAvg``, Flower's FedAvg with per-update
  validation and a ``min_clients`` quorum (the plain path).
- :mod:`~shieldtune.federated.secure`: ``EnclaveAggregation``, a strategy wrapper that moves
  aggregation into the server enclave; the host relays ciphertext only.
- :mod:`~shieldtune.federated.mods`: ``SealedUpdateMod``, the matching Flower client mod.
- :mod:`~shieldtune.federated.client_app` / :mod:`~shieldtune.federated.server_app`: the Flower
  apps, :mod:`~shieldtune.federated.simulation`: an in-process Grid to run them on one machine,
  :mod:`~shieldtune.federated.deploy`: Flower deployment plumbing (app bundle, polling grid,
  what the parties must agree on), :mod:`~shieldtune.federated.messages`: message types.
- :mod:`~shieldtune.federated.partition`: train / test shares of each client.
"""

__all__: list[str] = []
