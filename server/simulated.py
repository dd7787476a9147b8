"""How many hospitals a Flower simulation has: its number of simulated SuperNodes.

`flwr run .` on Flower's local simulation decides the federation's size (`num-supernodes`,
2 unless the user changes it); the ClientApp learns it from its node config
(`num-partitions`), the ServerApp from here, so `hospitals` never has to be set twice.
In a deployment this returns 0 and the configured `hospitals` is what the coordinator waits for.
"""
from __future__ import annotations

import time

SETTLE_POLLS = 3  # identical node counts in a row before the count is taken as final
POLL_SECONDS = 0.2


def simulated_hospitals(grid) -> int:
    """The number of simulated SuperNodes, or 0 when this ServerApp is not in a simulation."""
    # Flower's simulation runtime serves the ServerApp an in-process grid whose SuperNodes are
    # all registered at start-up; a deployment's grid talks to a SuperLink over the network.
    if type(grid).__name__ != "InMemoryGrid":
        return 0
    counts: list[int] = []
    while len(counts) < SETTLE_POLLS or len(set(counts[-SETTLE_POLLS:])) > 1 or counts[-1] == 0:
        counts.append(len(list(grid.get_node_ids())))
        time.sleep(POLL_SECONDS)
    return counts[-1]
