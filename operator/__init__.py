"""Kubernetes operator (kopf handlers) for the HelixCluster resource."""
