"""The worker process (`helix.worker.server`): one layer shard behind a ZeroMQ address.

`server` holds it for now; the package keeps `from helix.worker.server import WorkerServer` working.
"""

from helix.worker.server.server import WorkerServer, WorkerStats, default_threads, error_code

__all__ = ["WorkerServer", "WorkerStats", "default_threads", "error_code"]
