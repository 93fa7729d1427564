"""Placement methods (MILP and heuristic baselines) behind one registry."""
