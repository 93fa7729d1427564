"""The planning core: cluster, model, GPU catalog, profiles, flow graph, placement, validation and plans."""
