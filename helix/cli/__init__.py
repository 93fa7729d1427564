"""The `helix` command line: planning, cluster files and (from other modules) the rest of the system.

Command modules keep heavy imports (OR-Tools, matplotlib, the simulator) inside their functions so
`helix --help` answers instantly.
"""
