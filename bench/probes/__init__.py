"""Probes that bench/README.md cites, each through the worker process and its protocol (or MLX alone)."""
