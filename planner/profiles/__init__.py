"""GPU performance profiles: analytic roofline, measured files, Helix's reference tables."""
