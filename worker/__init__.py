"""Data plane: layer-shard workers, ZeroMQ transport and the router."""
