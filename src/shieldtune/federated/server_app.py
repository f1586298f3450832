"""The Flower ``ServerApp``: the strategy's round loop, from an empty global adapter.

Round 1 starts from an empty ``ArrayRecord``: every client builds the same seeded initial
adapter, so the server (and, in secure-fedavg, its host) never needs one. The strategy is
:class:`~shieldtune.federated.strategy.ValidatedFedAvg` (plain-fedavg) or the same strategy
inside :class:`~shieldtune.federated.secure.EnclaveAggregation` (secure-fedavg).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy

__all__ = ["build_server_app", "start_rounds"]


def start_rounds(strategy: Strategy, grid: Grid, num_rounds: int, round_timeout_s: float) -> Result:
    """Run ``strategy`` for ``num_rounds`` on ``grid`` from an empty global adapter."""
    return strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),
        num_rounds=num_rounds,
        timeout=round_timeout_s,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
    )


def build_server_app(
    strategy: Strategy,
    num_rounds: int,
    round_timeout_s: float,
    on_result: Callable[[Result], None] | None = None,
) -> ServerApp:
    """A Flower ``ServerApp`` running ``strategy`` for ``num_rounds``.

    Args:
        strategy: The server strategy.
        num_rounds: Federated rounds.
        round_timeout_s: How long a round waits for replies before it goes on without them.
        on_result: Receives Flower's ``Result`` (per-round metrics, final arrays).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = start_rounds(strategy, grid, num_rounds, round_timeout_s)
        if on_result is not None:
            on_result(result)

    return app
