"""Everything that runs at the coordinator: the ServerApp, strategies, the round log."""
