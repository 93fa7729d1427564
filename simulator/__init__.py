"""The discrete-event simulator: requests and workloads, cluster state, schedulers, the engine, results."""
