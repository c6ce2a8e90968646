"""The cloud side of dlora: the frozen decoder stack, sessions, the Kill-and-Revive queue and the gRPC server."""
