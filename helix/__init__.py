"""Helix: serve one LLM across a heterogeneous GPU cluster at max-flow throughput."""

__version__ = "0.1.0"
