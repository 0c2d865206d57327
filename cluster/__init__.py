"""Cluster: Ray bootstrap, gateway, router, controller, metrics and the `pdserve` CLI."""
