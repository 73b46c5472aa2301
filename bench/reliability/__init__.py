"""Fuzz and soak at scale (RELIABILITY.md); figures in bench/reliability/RESULTS.md."""
