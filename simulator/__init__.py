"""Planning and simulation: cluster/model/profile models, flow graph, placement, simulator."""
