"""The paper's evaluation (Helix, ASPLOS'25, Sec 6) re-run with our planner and simulator, beside its numbers."""
