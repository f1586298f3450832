"""Flower message types of the sealed-update protocol (a constant-only module: cheap to import).

``query.<action>`` messages of the handshake, answered by
:class:`~shieldtune.federated.mods.SealedUpdateMod` on the client and sent by
:class:`~shieldtune.federated.secure.EnclaveAggregation` on the server.
"""

from __future__ import annotations

__all__ = ["HANDSHAKE_ACTIONS", "HELLO", "CONNECT", "SPLIT_FINISH_ACTION", "SPLIT_FINISH"]

HANDSHAKE_ACTIONS = ("shieldtune_hello", "shieldtune_connect")
HELLO = f"query.{HANDSHAKE_ACTIONS[0]}"
CONNECT = f"query.{HANDSHAKE_ACTIONS[1]}"
#: A deployed split federation is over: each client writes its run folder and reports its
#: steps and wire bytes (sent by the server after the last round).
SPLIT_FINISH_ACTION = "shieldtune_split_finish"
SPLIT_FINISH = f"query.{SPLIT_FINISH_ACTION}"
